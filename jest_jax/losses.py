"""Contrastive losses on L2-normalised embeddings (rows = images, cols = texts).

The pair-loss formula lives in ``pair_losses_block`` only; the dense matrix,
the matrix-free selection blocks and the batch loss are all built on it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def positive_mask(row_ids: jax.Array, col_ids: jax.Array) -> jax.Array:
    """``bool[M, K]``: True where row and column index the same example."""
    return row_ids[:, None] == col_ids[None, :]


def pair_losses_block(
    img_rows: jax.Array,
    txt_cols: jax.Array,
    log_temperature: jax.Array,
    bias: jax.Array,
    is_positive: jax.Array,
) -> jax.Array:
    """SigLIP pair losses for a block of image rows and text columns.

    ``pair_ij = -log_sigmoid(z_ij * (exp(t') <x_i, y_j> + β))`` with ``z = +1``
    where ``is_positive`` and ``-1`` elsewhere. Shapes: ``img_rows f32[M, D]``,
    ``txt_cols f32[K, D]``, ``is_positive bool[M, K]`` -> ``f32[M, K]``.
    Computed in float32 at least (bfloat16 inputs are upcast; float64 stays float64).
    """
    dtype = jnp.result_type(img_rows.dtype, txt_cols.dtype, jnp.float32)
    img = img_rows.astype(dtype)
    txt = txt_cols.astype(dtype)
    scale = jnp.exp(jnp.asarray(log_temperature, dtype))
    logits = scale * (img @ txt.T) + jnp.asarray(bias, dtype)
    signs = jnp.where(is_positive, 1.0, -1.0)
    return -jax.nn.log_sigmoid(signs * logits)


def sigmoid_pair_losses(
    img: jax.Array, txt: jax.Array, log_temperature: jax.Array, bias: jax.Array
) -> jax.Array:
    """The full ``f32[N, N]`` pair-loss matrix of a batch of N aligned pairs."""
    n = img.shape[0]
    return pair_losses_block(img, txt, log_temperature, bias, jnp.eye(n, dtype=bool))


def sigmoid_loss(
    img: jax.Array, txt: jax.Array, log_temperature: jax.Array, bias: jax.Array
) -> jax.Array:
    """SigLIP batch loss: the sum of all pair losses divided by N."""
    pair = sigmoid_pair_losses(img, txt, log_temperature, bias)
    return pair.sum() / img.shape[0]


def softmax_loss(img: jax.Array, txt: jax.Array, log_temperature: jax.Array) -> jax.Array:
    """CLIP loss: mean of the image→text and text→image cross-entropies."""
    img = img.astype(jnp.float32)
    txt = txt.astype(jnp.float32)
    logits = jnp.exp(jnp.asarray(log_temperature, jnp.float32)) * (img @ txt.T)
    img_to_txt = jnp.diagonal(jax.nn.log_softmax(logits, axis=1))
    txt_to_img = jnp.diagonal(jax.nn.log_softmax(logits, axis=0))
    return -0.5 * (img_to_txt.mean() + txt_to_img.mean())
