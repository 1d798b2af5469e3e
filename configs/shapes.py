"""SigLIP and JEST on the embedded `jest_shapes` data: the reference or a learner stage.

    # 1. reference model, trained on the clean curated pool
    python -m jest_jax.main --config configs/shapes.py:stage=reference --workdir runs/ref
    # 2. learner on the noisy raw pool; uniform sampling = plain SigLIP
    python -m jest_jax.main --config configs/shapes.py:stage=learner --workdir runs/uniform
    # 3. JEST learner: joint selection by learnability against the reference of step 1
    python -m jest_jax.main --workdir runs/jest \\
        --config configs/shapes.py:stage=learner,method=joint,reference=runs/ref
    #    ... or with the reference embeddings cached once (no reference forward passes)
    JEST=configs/shapes.py:stage=learner,method=joint,reference=runs/ref,cache=runs/ref/cache
    python -m jest_jax.main --config $JEST --mode cache
    python -m jest_jax.main --config $JEST --workdir runs/jest

`method` is uniform | independent | joint, `criterion` any registered name or
"module:function", `filter` the filtering ratio f. `flexi=True` makes it Flexi-JEST
(paper §3.3): the learner scores the super-batch at twice the patch size and trains
half of each batch (λ = 0.5) at twice the patch size, the rest at full resolution; a
plain uniform learner then trains at both resolutions too; it also evaluates zero-shot at
the low resolution (`evals.zero_shot_low_res`). The text tower is the half-width `nano`
(below). `steps=N` changes the length;
`confusable=True` trains and evaluates on the `jest_shapes/confusable` build instead, where a
super-batch holds many pairs that differ only in colour (jest_jax/data/shapes.py).
`runlocal=True` switches to the tiny dataset and 30 steps, a check that the path runs.
"""

import ml_collections

from jest_jax import config as jj


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Args: stage=reference|learner, method, criterion, filter, flexi, reference, cache,
    steps, confusable, runlocal."""
    arg = jj.parse_arg(arg, stage="reference", method="uniform", criterion="learnability",
                       filter=0.8, flexi=False, reference="", cache="", steps=1000,
                       confusable=False, runlocal=False)
    if arg.stage not in ("reference", "learner"):
        raise ValueError(f"configs/shapes.py: stage={arg.stage!r}; use reference or learner")
    c = jj.defaults()
    dataset = ("jest_shapes/tiny" if arg.runlocal
               else "jest_shapes/confusable" if arg.confusable else "jest_shapes")
    # On this data small batches and more steps beat large batches at equal compute.
    c.batch_size = 64
    c.total_steps = 30 if arg.runlocal else arg.steps
    c.data.train = jj.pool(dataset, "curated" if arg.stage == "reference" else "raw")
    c.data.image_size = 32
    c.data.text_len = 32
    c.model.patch_size = 4
    # A text tower half the image tower's width, so that text is ~1/9 of a forward pass
    # (B/16 at 256 px with 16 tokens: ~1/14), not 1/3 as with two "tiny" towers: Flexi-JEST
    # shrinks only the image tower, so its saving depends on that share (docs/design.md §1).
    c.model.text_variant = "nano"
    c.optimizer.learning_rate = 1e-3
    c.selection.method = arg.method
    c.selection.criterion = arg.criterion
    # Plain SigLIP draws just the batch; selection methods draw N = 64 / (1 - f).
    c.selection.filter_ratio = 0.0 if arg.method == "uniform" else arg.filter
    if arg.flexi:
        if arg.stage != "learner":
            raise ValueError("configs/shapes.py: flexi=True is for stage=learner")
        c.selection.score_patch_size = 2 * c.model.patch_size
        c.model.low_res_patch_size = 2 * c.model.patch_size
        c.model.low_res_fraction = 0.5
    c.selection.reference.workdir = arg.reference
    c.selection.reference.cache_dir = arg.cache
    c.evals.every_steps = 10 if arg.runlocal else 200
    c.evals.zero_shot.data = jj.pool(dataset, "eval")
    c.evals.retrieval.data = jj.pool(dataset, "eval")
    if arg.flexi:  # the optional Flexi metric: zero-shot at the low resolution too
        c.evals.zero_shot_low_res = c.evals.zero_shot.copy_and_resolve_references()
        c.evals.zero_shot_low_res.patch_size = c.model.low_res_patch_size
    c.checkpoint.every_steps = 200
    return c
