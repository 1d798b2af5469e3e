"""The paper's findings at small scale, on the embedded `jest_shapes` data (`make reproduce`).

    S=configs/studies/reproduce.py
    python experiments/compare.py $S:study=fig3 --workdir runs/reproduce
    python experiments/compare.py $S:study=headline --workdir runs/reproduce
    python experiments/compare.py $S:study=reference --workdir runs/reproduce

The three studies share one workdir and one set of definitions, so a run two studies both
need (the reference, `uniform`, `joint_f0.8`, which is JEST) is trained once and reused.
Every learner: batch 64 on the raw pool (44.8% clean), 300 steps unless it says otherwise,
zero-shot every 25 steps, seeds 0, 1, 2. Target: `zero_shot/learned`, the mean zero-shot
accuracy over the attributes this CPU model learns (colour and size; shape and position
stay near chance, docs/results.md "The embedded benchmark").

* demo (`make demo`): uniform, three independent criteria and JEST, one seed.
* fig3: joint against independent learnability at f = 0.5, 0.8 and 0.9 (paper Fig. 3).
* headline: uniform trained 4x longer (1200 steps) sets the target; JEST and Flexi-JEST
  train 300 (paper Fig. 1 and Table 1: iterations and FLOPs to the baseline's accuracy).
* reference: JEST with references trained on curated pools of different size and
  cleanliness (paper §4: JEST vs JEST++, a better reference dataset gives a better JEST).
* confusable: joint against independent selection on `jest_shapes/confusable`, where a
  super-batch holds many pairs that differ only in colour (in-batch hard negatives, the
  paper's explanation of the joint advantage). Target: zero-shot colour, the attribute
  that tells those pairs apart; its own reference, trained on that build's curated pool.
"""

SHAPES = "configs/shapes.py"
STEPS, REF_STEPS = 300, 1000
LEARNED = ("zero_shot/color", "zero_shot/size")
REPORT = ("zero_shot/shape", "zero_shot/color", "zero_shot/size", "zero_shot/position",
          "retrieval/i2t_r1", "retrieval/t2i_r1")
# The curated pool has 10,000 clean pairs; the raw pool 40,000 of which 44.8% are clean.
REFERENCES = {
    "curated": {"config": f"{SHAPES}:stage=reference,steps={REF_STEPS}"},
    "curated_1k": {"config": f"{SHAPES}:stage=reference,steps={REF_STEPS}",
                   "set": {"data.train.split": "curated[:1000]"}},
    "raw_10k": {"config": f"{SHAPES}:stage=reference,steps={REF_STEPS}",
                "set": {"data.train.split": "raw[:10000]"}},
}


CONFUSABLE = {"config": f"{SHAPES}:stage=reference,steps={REF_STEPS},confusable=True"}


def _joint(f: float, reference: str = "curated", gain: float = 0.0) -> dict:
    variant = {"method": "joint", "criterion": "learnability", "filter": f,
               "reference": reference}
    if gain:  # sharper sampling than the default selection.score_gain = 1
        variant["set"] = {"selection.score_gain": gain}
    return variant


def _independent(f: float, reference: str = "curated") -> dict:
    return {"method": "independent", "criterion": "learnability", "filter": f,
            "reference": reference}


STUDIES = {
    "demo": dict(
        title="Method comparison on jest_shapes (make demo)",
        description=(
            "Does selecting by learnability, jointly, reach plain SigLIP's final accuracy "
            "in fewer steps on a noisy pool? The raw pool is 44.8% clean; the rest are "
            "mismatched or generic captions, destroyed images and near-duplicates. "
            "`joint_f0.8` is JEST; `indep_f0.8` selects by the same learnability scores "
            "independently; easy_reference keeps what the reference finds easy, "
            "hard_learner what the learner finds hard. One seed keeps `make demo` short; "
            "`make reproduce` runs three (study=fig3)."),
        variants={"uniform": {"method": "uniform"},
                  "easy_reference": {"method": "independent", "criterion": "easy_reference",
                                     "filter": 0.8, "reference": "curated"},
                  "hard_learner": {"method": "independent", "criterion": "hard_learner",
                                   "filter": 0.8},
                  "indep_f0.8": _independent(0.8),
                  "joint_f0.8": _joint(0.8)},
        references={"curated": REFERENCES["curated"]},
        seeds=(0,),
        command="make demo",
    ),
    "fig3": dict(
        title="Joint against independent selection as the filtering ratio grows (Fig. 3)",
        description=(
            "Paper Fig. 3: with learnability scores, joint selection beats independent "
            "selection, and the gap grows with the filtering ratio f. Here both select "
            "from N = 64 / (1 - f) candidates per step with the same cached reference. "
            "`joint_f0.8_g10` samples with score gain 10 instead of 1, about as sharp as "
            "independent top-k."),
        variants={"uniform": {"method": "uniform"},
                  **{f"joint_f{f}": _joint(f) for f in (0.5, 0.8, 0.9)},
                  **{f"indep_f{f}": _independent(f) for f in (0.5, 0.8, 0.9)},
                  # Joint sampling as sharp as independent top-k (docs/results.md, Fig. 2).
                  "joint_f0.8_g10": _joint(0.8, gain=10.0)},
        references={"curated": REFERENCES["curated"]},
    ),
    "headline": dict(
        title="Steps and FLOPs to a 4x longer uniform run's accuracy (Fig. 1, Table 1)",
        description=(
            "Paper: JEST matches the uniform baseline with 13x fewer iterations, and "
            "Flexi-JEST with 10x less compute. Here uniform trains 1200 steps, 4x the "
            "selection learners' 300; its final accuracy is the target. `joint_f0.8` is "
            "JEST; Flexi-JEST scores at twice the patch size and trains half of each batch "
            "there. Total FLOPs charge each selection run 1/K of the reference's training "
            "and cache pass (K = the selection runs here that share it)."),
        variants={"uniform_long": {"method": "uniform", "steps": 4 * STEPS},
                  "uniform": {"method": "uniform"},
                  "joint_f0.8": _joint(0.8),
                  "Flexi-JEST": {**_joint(0.8), "flexi": True}},
        references={"curated": REFERENCES["curated"]},
        baseline="uniform_long",
    ),
    "reference": dict(
        title="Reference quality: JEST with references trained on different pools",
        description=(
            "Paper §4 (JEST++): a reference trained on better curated data gives a better "
            "JEST. References here: `curated` (10,000 clean pairs), `curated_1k` (1,000 of "
            "them: smaller) and `raw_10k` (10,000 pairs of the raw pool, 44.8% clean: "
            "dirtier), each trained 1000 steps; JEST at f = 0.8 with each."),
        variants={"uniform": {"method": "uniform"},
                  "joint_f0.8": _joint(0.8),
                  "joint_f0.8_ref1k": _joint(0.8, "curated_1k"),
                  "joint_f0.8_refraw": _joint(0.8, "raw_10k")},
        references=REFERENCES,
    ),
    "confusable": dict(
        title="Joint against independent selection among confusable pairs",
        description=(
            "The paper attributes joint selection's advantage to hard negatives inside the "
            "batch. On `jest_shapes/confusable` every object is one of 16 (shape, size, "
            "position) families in any of 8 colours, and every caption names the colour, "
            "so a super-batch of 320 holds about 20 members of each family that differ "
            "only in colour. Same learners as fig3 at f = 0.8 (variant names carry `conf_` "
            "so that they share the workdir), with a reference trained on this build's "
            "curated pool. Target: zero-shot colour."),
        base=f"{SHAPES}:stage=learner,steps={STEPS},confusable=True",
        variants={"conf_uniform": {"method": "uniform"},
                  "conf_indep_f0.8": _independent(0.8, "confusable"),
                  "conf_joint_f0.8": _joint(0.8, "confusable"),
                  "conf_joint_f0.8_g10": _joint(0.8, "confusable", gain=10.0)},
        references={"confusable": CONFUSABLE},
        baseline="conf_uniform",
        target="zero_shot/color",
    ),
}


def get_study(arg: str | None = None) -> dict:
    """Arg: study=demo|fig3|headline|reference|confusable."""
    name = (arg or "").removeprefix("study=")
    if name not in STUDIES:
        raise ValueError(f"configs/studies/reproduce.py: study={name!r}; use one of "
                         f"{list(STUDIES)}")
    return {**dict(
        name=name,
        base=f"{SHAPES}:stage=learner,steps={STEPS}",
        baseline="uniform",
        seeds=(0, 1, 2),
        metrics={"zero_shot/learned": LEARNED},
        target="zero_shot/learned",
        report=REPORT,
        eval_every=25,
        command=f"python experiments/compare.py configs/studies/reproduce.py:study={name} "
                "--workdir runs/reproduce",
    ), **STUDIES[name]}
