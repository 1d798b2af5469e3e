"""Dual encoder (image tower + text tower) with SigLIP's learnable t' and β."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jest_jax.models.layers import resolve_dtype
from jest_jax.models.text import TextTransformer
from jest_jax.models.vit import ViT


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Unit-normalises the last axis in float32.

    Clamping the squared norm (not the norm) keeps the gradient finite at 0.
    """
    x = x.astype(jnp.float32)
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def _unit(x: jax.Array, with_norm: bool) -> jax.Array | tuple[jax.Array, jax.Array]:
    unit = l2_normalize(x)
    if not with_norm:
        return unit
    return unit, jnp.linalg.norm(x.astype(jnp.float32), axis=-1)


class TwoTower(nnx.Module):
    """Image and text towers mapping into one ``embed_dim`` space."""

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        image_variant: str | dict,
        text_variant: str | dict,
        vocab_size: int,
        text_len: int,
        embed_dim: int,
        dtype: Any = jnp.float32,
        image_pool: str = "map",
        image_head: bool = True,
        text_pool: str = "mean",
        temperature_init: float = 10.0,
        bias_init: float = -10.0,
        remat: bool = False,
        rngs: nnx.Rngs,
    ):
        dtype = resolve_dtype(dtype)
        self.image = ViT(
            image_size=image_size,
            patch_size=patch_size,
            variant=image_variant,
            out_dim=embed_dim,
            dtype=dtype,
            pool=image_pool,
            head=image_head,
            remat=remat,
            rngs=rngs,
        )
        self.text = TextTransformer(
            vocab_size=vocab_size,
            max_len=text_len,
            variant=text_variant,
            out_dim=embed_dim,
            dtype=dtype,
            remat=remat,
            pool=text_pool,
            rngs=rngs,
        )
        self.log_temperature = nnx.Param(jnp.asarray(math.log(temperature_init), jnp.float32))
        self.bias = nnx.Param(jnp.asarray(bias_init, jnp.float32))

    def embed_images(self, images: jax.Array, patch_size: int | None = None,
                     with_norm: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        """``f32[B, H, W, 3] -> f32[B, D]``, unit norm; see ``ViT.__call__``. With
        ``with_norm``, also the norms before normalisation, ``f32[B]``."""
        return _unit(self.image(images, patch_size), with_norm)

    def embed_texts(self, tokens: jax.Array, with_norm: bool = False
                    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """``int32[B, L] -> f32[B, D]``, unit norm (and the norms, as ``embed_images``)."""
        return _unit(self.text(tokens), with_norm)

    def __call__(
        self, images: jax.Array, tokens: jax.Array, patch_size: int | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Returns the unit-norm ``(image_embeddings, text_embeddings)``."""
        return self.embed_images(images, patch_size), self.embed_texts(tokens)
