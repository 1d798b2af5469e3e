"""Smoke run: a tiny SigLIP on the tiny embedded data, under two minutes on a 2-core CPU.

    python -m jest_jax.main --config configs/smoke.py --workdir runs/smoke
"""

import ml_collections

from jest_jax import config as jj


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The smoke config; `steps=N` sets its length."""
    arg = jj.parse_arg(arg, steps=60)
    c = jj.defaults()
    c.batch_size = 64
    c.total_steps = arg.steps
    c.data.train = jj.pool("jest_shapes/tiny", "curated")
    c.data.image_size = 16
    c.data.text_len = 24
    c.model.patch_size = 4
    c.model.embed_dim = 64
    c.evals.every_steps = 0
    c.evals.batch_size = 64
    c.evals.zero_shot.data = jj.pool("jest_shapes/tiny", "eval")
    c.evals.retrieval.data = jj.pool("jest_shapes/tiny", "eval")
    c.checkpoint.every_steps = 20
    c.logging.every_steps = 10
    return c
