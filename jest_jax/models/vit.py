"""FlexiViT image tower: one set of weights, any patch size dividing the image."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jest_jax.models.layers import PARAM_DTYPE, Encoder, MAPHead, resolve_dtype
from jest_jax.models.layers import variant as resolve_variant

# Image pooling: "gap" (mean over tokens) | "map" (attention pooling, as SigLIP).
POOLS = ("gap", "map")


def _bilinear_resize_matrix(old: int, new: int) -> np.ndarray:
    """The float64 ``[new*new, old*old]`` matrix of ``jax.image.resize`` (bilinear)."""
    basis = np.eye(old * old, dtype=np.float32).reshape(old * old, old, old)
    # Shapes are static, so this runs once per trace even inside jit.
    with jax.ensure_compile_time_eval():
        resized = jax.image.resize(basis, (old * old, new, new), method="bilinear")
    return np.asarray(resized, np.float64).reshape(old * old, new * new).T


def resize_patch_embedding(kernel: jax.Array, new_patch_size: int) -> jax.Array:
    """PI-resizes a patch-embedding kernel ``[p, p, C, D] -> [new_p, new_p, C, D]``.

    FlexiViT (Beyer et al., 2023): with ``A`` the bilinear resize matrix, the
    new kernel solves ``A^T w_new = w`` in the least-squares sense, so that
    ``<resize(x), w_new> = <x, w>`` for every patch ``x``; exact when upsampling.
    """
    p, p2, channels, width = kernel.shape
    if p != p2:
        raise ValueError(f"Patch kernel must be square, got shape {kernel.shape}.")
    if new_patch_size == p:
        return kernel
    # The pseudo-inverse is taken in float64 on the host: it is a constant of
    # the trace, and doing it on an accelerator at reduced matmul precision
    # would break the inner-product identity.
    resize = _bilinear_resize_matrix(p, new_patch_size)
    pinv_t = jnp.asarray(np.linalg.pinv(resize).T, kernel.dtype)  # [new², p²]
    flat = kernel.reshape(p * p, channels * width)
    new = jnp.matmul(pinv_t, flat, precision=jax.lax.Precision.HIGHEST)
    return new.reshape(new_patch_size, new_patch_size, channels, width)


class ViT(nnx.Module):
    """Vision transformer with attention ("map") or mean ("gap") pooling and a linear head;
    FlexiViT-ready."""

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        variant: str | dict,
        out_dim: int,
        dtype: Any = jnp.float32,
        remat: bool = False,
        pool: str = "map",
        head: bool = True,
        rngs: nnx.Rngs,
    ):
        if image_size % patch_size:
            raise ValueError(f"patch_size {patch_size} does not divide image_size {image_size}.")
        cfg = resolve_variant(variant)
        width = cfg["width"]
        grid = image_size // patch_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.dtype = resolve_dtype(dtype)
        self.patch_kernel = nnx.Param(
            nnx.initializers.lecun_normal()(
                rngs.params(), (patch_size, patch_size, 3, width), PARAM_DTYPE
            )
        )
        self.patch_bias = nnx.Param(jnp.zeros((width,), PARAM_DTYPE))
        # Stored at the base grid; resized on the fly for other patch sizes.
        self.pos_embedding = nnx.Param(
            nnx.initializers.normal(stddev=width**-0.5)(
                rngs.params(), (grid, grid, width), PARAM_DTYPE
            )
        )
        self.encoder = Encoder(dtype=self.dtype, rngs=rngs, remat=remat, **cfg)
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {list(POOLS)}, got {pool!r}.")
        self.map_head = (MAPHead(width, cfg["num_heads"], cfg["mlp_dim"], self.dtype, rngs)
                         if pool == "map" else None)
        # SigLIP's image tower has no head: the pooled token is the embedding (out_dim = width).
        if not head and out_dim != width:
            raise ValueError(f"without a head the output is the width {width}, not {out_dim}.")
        self.head = (nnx.Linear(width, out_dim, dtype=self.dtype, param_dtype=PARAM_DTYPE,
                                rngs=rngs) if head else None)

    def __call__(self, images: jax.Array, patch_size: int | None = None) -> jax.Array:
        """Embeds ``images: f32[B, H, W, 3]`` to ``f32[B, out_dim]`` (not normalised).

        ``patch_size=None`` uses the base patch size; any other size must divide
        H and W and reuses the base weights via PI-resize.
        """
        p = self.patch_size if patch_size is None else int(patch_size)
        batch, height, width_px, channels = images.shape
        if p <= 0 or height % p or width_px % p:
            raise ValueError(f"patch_size {p} does not divide the image size {height}x{width_px}.")
        kernel = resize_patch_embedding(self.patch_kernel[...], p)
        gh, gw = height // p, width_px // p
        # A stride-p conv with a p×p kernel is a matmul over non-overlapping patches.
        patches = images.astype(self.dtype).reshape(batch, gh, p, gw, p, channels)
        patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, gh, gw, -1)
        dim = kernel.shape[-1]
        x = patches @ kernel.reshape(-1, dim).astype(self.dtype)
        x = x + self.patch_bias[...].astype(self.dtype)

        pos = self.pos_embedding[...]
        if pos.shape[:2] != (gh, gw):
            pos = jax.image.resize(pos, (gh, gw, dim), method="bilinear")
        x = (x + pos.astype(self.dtype)).reshape(batch, gh * gw, dim)

        x = self.encoder(x)
        if self.map_head is not None:
            pooled = self.map_head(x)
        else:  # the mean in float32: bf16 sums over many tokens lose precision
            pooled = x.astype(jnp.float32).mean(axis=1)
        if self.head is not None:
            pooled = self.head(pooled)
        return pooled.astype(jnp.float32)
