"""The study behind `make demo`: plain SigLIP, three independent criteria and JEST on the
embedded `jest_shapes` data, one reference shared by all.

    python experiments/compare.py configs/studies/demo.py [--seeds 0,1] [--workdir runs/demo]

The reference trains 1000 steps on the clean curated pool and caches its embeddings of the
noisy raw pool; every learner trains 500 steps (batch 64) on the raw pool, selection
learners from N = 320 candidates (f = 0.8). Target: the mean zero-shot accuracy over the
attributes the model learns at this size (`zero_shot/learned`, colour and size; shape and
position stay near chance, docs/results.md "The embedded benchmark"). One seed keeps
`make demo` under 15 minutes on 2 cores; `make reproduce` runs more.
"""

SHAPES = "configs/shapes.py"
LEARNED = ("zero_shot/color", "zero_shot/size")


def get_study(arg: str | None = None) -> dict:
    del arg
    return dict(
        title="Method comparison on jest_shapes (make demo)",
        description=(
            "Does selecting by learnability, jointly, reach plain SigLIP's final accuracy "
            "in fewer steps on a noisy pool? The raw pool is 44.8% clean; the rest are "
            "mismatched or generic captions, destroyed images and near-duplicates."),
        base=f"{SHAPES}:stage=learner,steps=500",
        references={"curated": {"config": f"{SHAPES}:stage=reference,steps=1000"}},
        variants={
            "uniform": {"method": "uniform"},
            "easy_reference": {"method": "independent", "criterion": "easy_reference",
                               "reference": "curated"},
            "hard_learner": {"method": "independent", "criterion": "hard_learner"},
            "learnability": {"method": "independent", "criterion": "learnability",
                             "reference": "curated"},
            "JEST": {"method": "joint", "criterion": "learnability", "reference": "curated"},
        },
        baseline="uniform",
        seeds=(0,),
        metrics={"zero_shot/learned": LEARNED},
        target="zero_shot/learned",
        report=("zero_shot/shape", "zero_shot/color", "zero_shot/size", "zero_shot/position",
                "zero_shot/mean", "retrieval/i2t_r1", "retrieval/t2i_r1"),
        eval_every=50,
        command="make demo",
    )
