"""Compute accounting shared by the benchmarks and comparisons: the relative cost of a
forward pass at another patch size, measured by XLA, for the paper's §A.4 formula
(`jest_jax.metrics.a4_step_ratio`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jest_jax import config as config_lib
from jest_jax.metrics import a4_step_ratio, compiled_flops
from jest_jax.models import Model

ROWS = 8  # examples per measured forward pass; the cost is per example


def forward_flops(spec: config_lib.Spec, vocab_size: int, patch_size: int | None) -> float:
    """XLA's FLOPs of the two-tower forward pass (image and text) on `ROWS` examples."""
    model = Model(spec.model, vocab_size)
    size, length = spec.data.image_size, spec.data.text_len
    batch = {"image": jax.ShapeDtypeStruct((ROWS, size, size, 3), jnp.uint8),
             "tokens": jax.ShapeDtypeStruct((ROWS, length), jnp.int32)}
    fn = jax.jit(functools.partial(model.embeddings, patch_size=patch_size))
    return compiled_flops(fn.lower(model.abstract_params(), batch).compile())


def a4_prediction(spec: config_lib.Spec, vocab_size: int) -> dict[str, float]:
    """§A.4's predicted step cost ÷ a uniform step for `spec`, with each patch size's
    forward-pass share `r` measured by XLA; also the `r`s."""
    score_patch = spec.selection.score_patch_size
    low_patch = spec.model.low_res_patch_size
    low = spec.model.low_res_examples(spec.batch_size)
    full = forward_flops(spec, vocab_size, None) if score_patch or low else 1.0
    r_s = forward_flops(spec, vocab_size, score_patch) / full if score_patch else 1.0
    r_t = forward_flops(spec, vocab_size, low_patch) / full if low else 1.0
    scoring = spec.selection.method.uses_scores
    n_over_b = spec.selection.num_candidates / spec.batch_size if scoring else 0.0
    return {"ratio": a4_step_ratio(n_over_b, r_s, low / spec.batch_size, r_t),
            "r_score": r_s, "r_train": r_t}
