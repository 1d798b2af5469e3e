"""Text tower: transformer over token ids, pooled by the mean of the non-padding tokens
or, as SigLIP does, by the last position."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jest_jax.data.tokenizer import PAD_ID
from jest_jax.models.layers import PARAM_DTYPE, Encoder, resolve_dtype
from jest_jax.models.layers import variant as resolve_variant

# Text pooling: "mean" over the tokens that are not padding (id 0, which no token attends
# to) | "last": the last position, with no padding mask, as big_vision's SigLIP text tower
# (its tokens end in a sticky EOS, so the last position always sees the whole caption).
TEXT_POOLS = ("mean", "last")


class TextTransformer(nnx.Module):
    """Bidirectional text transformer; with "mean" pooling token id 0 is padding and is
    ignored, with "last" every position is attended to."""

    def __init__(
        self,
        *,
        vocab_size: int,
        max_len: int,
        variant: str | dict,
        out_dim: int,
        dtype: Any = jnp.float32,
        remat: bool = False,
        pool: str = "mean",
        rngs: nnx.Rngs,
    ):
        if pool not in TEXT_POOLS:
            raise ValueError(f"pool must be one of {list(TEXT_POOLS)}, got {pool!r}.")
        self.pool = pool
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
        x = self.embedding(tokens) + self.pos_embedding[:length].astype(self.dtype)
        if self.pool == "last":
            x = self.encoder(x).astype(jnp.float32)
            return self.head(x[:, -1]).astype(jnp.float32)
        valid = tokens != PAD_ID
        x = self.encoder(x, valid).astype(jnp.float32)

        weights = valid.astype(jnp.float32)[..., None]
        # All-padding rows pool to zeros instead of NaN.
        count = jnp.maximum(weights.sum(axis=1), 1.0)
        pooled = (x * weights).sum(axis=1) / count
        return self.head(pooled).astype(jnp.float32)
