"""SigLIP on the embedded `jest_shapes` data: the reference or the learner stage.

    # reference model, trained on the clean curated pool
    python -m jest_jax.main --config configs/shapes.py:stage=reference --workdir runs/ref
    # learner, trained on the noisy raw pool (uniform sampling = plain SigLIP)
    python -m jest_jax.main --config configs/shapes.py:stage=learner --workdir runs/learner

`steps=N` changes the length; `runlocal=True` shrinks everything to a one-minute check.
"""

from configs import common


def get_config(arg: str | None = None):
    arg = common.parse_arg(arg, stage="reference", steps=600, runlocal=False)
    if arg.stage not in ("reference", "learner"):
        raise ValueError(f"configs/shapes.py: stage={arg.stage!r}; use reference or learner")
    c = common.get_base_config()
    dataset = "jest_shapes/tiny" if arg.runlocal else "jest_shapes"
    c.batch_size = 128
    c.total_steps = 30 if arg.runlocal else arg.steps
    c.data.train = common.pool(dataset, "curated" if arg.stage == "reference" else "raw")
    c.data.image_size = 32
    c.data.text_len = 32
    c.model.patch_size = 4
    c.optimizer.learning_rate = 1e-3
    c.evals.every_steps = 10 if arg.runlocal else 100
    c.evals.zero_shot.data = common.pool(dataset, "eval")
    c.evals.retrieval.data = common.pool(dataset, "eval")
    c.checkpoint.every_steps = 100
    return c
