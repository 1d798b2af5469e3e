"""Text tower: transformer over token ids, mean-pooled over non-padding tokens."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jest_jax.data.tokenizer import PAD_ID
from jest_jax.models.layers import PARAM_DTYPE, Encoder, resolve_dtype
from jest_jax.models.layers import variant as resolve_variant


class TextTransformer(nnx.Module):
    """Bidirectional text transformer; token id 0 is padding and is ignored."""

    def __init__(
        self,
        *,
        vocab_size: int,
        max_len: int,
        variant: str | dict,
        out_dim: int,
        dtype: Any = jnp.float32,
        remat: bool = False,
        rngs: nnx.Rngs,
    ):
        cfg = resolve_variant(variant)
        width = cfg["width"]
        self.max_len = max_len
        self.dtype = resolve_dtype(dtype)
        self.embedding = nnx.Embed(
            vocab_size,
            width,
            dtype=self.dtype,
            param_dtype=PARAM_DTYPE,
            embedding_init=nnx.initializers.normal(stddev=width**-0.5),
            rngs=rngs,
        )
        self.pos_embedding = nnx.Param(
            nnx.initializers.normal(stddev=width**-0.5)(
                rngs.params(), (max_len, width), PARAM_DTYPE
            )
        )
        self.encoder = Encoder(dtype=self.dtype, rngs=rngs, remat=remat, **cfg)
        self.head = nnx.Linear(width, out_dim, dtype=self.dtype, param_dtype=PARAM_DTYPE, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Embeds ``tokens: int32[B, L]`` (L <= max_len) to ``f32[B, out_dim]``."""
        length = tokens.shape[-1]
        if length > self.max_len:
            raise ValueError(
                f"Token length {length} exceeds the text tower's max_len {self.max_len}."
            )
        valid = tokens != PAD_ID
        x = self.embedding(tokens) + self.pos_embedding[:length].astype(self.dtype)
        x = self.encoder(x, valid).astype(jnp.float32)

        weights = valid.astype(jnp.float32)[..., None]
        # All-padding rows pool to zeros instead of NaN.
        count = jnp.maximum(weights.sum(axis=1), 1.0)
        pooled = (x * weights).sum(axis=1) / count
        return self.head(pooled).astype(jnp.float32)
