"""Shared transformer pieces: size variants, dtype parsing, the encoder stack."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# Widths / depths follow the ViT naming used by SigLIP ("So400m": the shape-optimised 400M
# ViT of Alabdulmohsin et al., 2023, SigLIP's largest tower); "tiny" is a CPU toy size,
# and "nano" a CPU text tower half its width (configs/shapes.py, docs/design.md §1).
VARIANTS: dict[str, dict[str, int]] = {
    "nano": dict(width=32, depth=2, num_heads=2, mlp_dim=128),
    "tiny": dict(width=64, depth=2, num_heads=2, mlp_dim=256),
    "Ti": dict(width=192, depth=12, num_heads=3, mlp_dim=768),
    "S": dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
    "M": dict(width=512, depth=12, num_heads=8, mlp_dim=2048),
    "B": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "L": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
    "So400m": dict(width=1152, depth=27, num_heads=16, mlp_dim=4304),
}

_VARIANT_KEYS = ("width", "depth", "num_heads", "mlp_dim")

# Params are always stored in float32; only the compute dtype varies.
PARAM_DTYPE = jnp.float32
DTYPES = ("float32", "bfloat16")  # the compute dtypes a config may name


def variant(spec: str | Mapping[str, Any]) -> dict[str, int]:
    """Resolves a size spec to ``dict(width, depth, num_heads, mlp_dim)``.

    ``spec`` is a name from ``VARIANTS`` or a mapping. A mapping either gives
    all four fields, or names a base with ``"name"`` and overrides some fields,
    e.g. ``{"name": "S", "depth": 6}``.
    """
    if isinstance(spec, str):
        if spec not in VARIANTS:
            raise ValueError(f"Unknown model variant {spec!r}; valid names: {sorted(VARIANTS)}.")
        return dict(VARIANTS[spec])
    if not isinstance(spec, Mapping):
        raise ValueError(f"Model variant must be a name or a mapping, got {spec!r}.")
    overrides = dict(spec)
    base = variant(overrides.pop("name")) if "name" in overrides else {}
    unknown = set(overrides) - set(_VARIANT_KEYS)
    if unknown:
        raise ValueError(
            f"Unknown model variant fields {sorted(unknown)}; valid: {list(_VARIANT_KEYS)}."
        )
    cfg = {**base, **overrides}
    missing = [k for k in _VARIANT_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"Model variant {spec!r} is missing fields {missing}.")
    cfg = {k: int(cfg[k]) for k in _VARIANT_KEYS}
    if cfg["width"] % cfg["num_heads"]:
        raise ValueError(
            f"Model variant width {cfg['width']} is not divisible by num_heads {cfg['num_heads']}."
        )
    return cfg


def resolve_dtype(dtype: Any) -> jnp.dtype:
    """Parses a compute dtype given as a jnp dtype or a name like "bfloat16"."""
    try:
        resolved = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"Unknown dtype {dtype!r}.") from e
    if not jnp.issubdtype(resolved, jnp.floating):
        raise ValueError(f"Compute dtype must be floating point, got {resolved}.")
    return resolved


class Attention(nnx.Module):
    """Multi-head attention (self, or from `x` to a `context`) with a key-padding mask.

    Written out (rather than ``nnx.MultiHeadAttention``) so every kernel is a
    2-D ``[in, out]`` matrix and every bias 1-D: weight-decay masks and
    sharding rules can then go by rank and name alone.
    """

    def __init__(self, width: int, num_heads: int, dtype: Any, rngs: nnx.Rngs):
        linear = dict(
            kernel_init=nnx.initializers.xavier_uniform(),
            dtype=dtype,
            param_dtype=PARAM_DTYPE,
            rngs=rngs,
        )
        self.num_heads = num_heads
        self.query = nnx.Linear(width, width, **linear)
        self.key = nnx.Linear(width, width, **linear)
        self.value = nnx.Linear(width, width, **linear)
        self.out = nnx.Linear(width, width, **linear)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None,
                 context: jax.Array | None = None) -> jax.Array:
        """Queries from ``x: [B, T, width]``, keys/values from ``context: [B, S, width]``
        (default ``x``); ``mask: bool[B, S]`` (True = valid key)."""
        context = x if context is None else context
        batch, length, width = x.shape
        heads = lambda y: y.reshape(batch, y.shape[1], self.num_heads, width // self.num_heads)
        q, k, v = heads(self.query(x)), heads(self.key(context)), heads(self.value(context))
        attn_mask = None if mask is None else mask[:, None, None, :]
        # Logits and softmax run in float32 inside, whatever the compute dtype.
        y = jax.nn.dot_product_attention(q, k, v, mask=attn_mask)
        return self.out(y.reshape(batch, length, width))


class EncoderBlock(nnx.Module):
    """Pre-LayerNorm transformer block: x + MHA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, dtype: Any, rngs: nnx.Rngs):
        common = dict(dtype=dtype, param_dtype=PARAM_DTYPE, rngs=rngs)
        self.ln_attn = nnx.LayerNorm(width, **common)
        self.attn = Attention(width, num_heads, dtype, rngs)
        self.ln_mlp = nnx.LayerNorm(width, **common)
        mlp_init = dict(
            kernel_init=nnx.initializers.xavier_uniform(),
            bias_init=nnx.initializers.normal(stddev=1e-6),
        )
        self.mlp_in = nnx.Linear(width, mlp_dim, **mlp_init, **common)
        self.mlp_out = nnx.Linear(mlp_dim, width, **mlp_init, **common)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x = x + self.attn(self.ln_attn(x), mask)
        h = jax.nn.gelu(self.mlp_in(self.ln_mlp(x)))
        return x + self.mlp_out(h)


class MAPHead(nnx.Module):
    """Multi-head attention pooling: a learned probe attends over the tokens (SigLIP's
    image pooling). Unlike a mean, it can attend to a small object and ignore background."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, dtype: Any, rngs: nnx.Rngs):
        common = dict(dtype=dtype, param_dtype=PARAM_DTYPE, rngs=rngs)
        self.probe = nnx.Param(nnx.initializers.xavier_uniform()(
            rngs.params(), (1, width), PARAM_DTYPE))
        self.attn = Attention(width, num_heads, dtype, rngs)
        self.ln = nnx.LayerNorm(width, **common)
        self.mlp_in = nnx.Linear(width, mlp_dim, **common)
        self.mlp_out = nnx.Linear(mlp_dim, width, **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x: [B, T, width]`` → ``[B, width]``."""
        probe = jnp.broadcast_to(self.probe[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        y = self.attn(probe, context=x)
        y = y + self.mlp_out(jax.nn.gelu(self.mlp_in(self.ln(y))))
        return y[:, 0]


class Encoder(nnx.Module):
    """A stack of pre-LN transformer blocks followed by a final LayerNorm."""

    def __init__(
        self,
        width: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        dtype: Any,
        rngs: nnx.Rngs,
        remat: bool = False,
    ):
        self.dtype = resolve_dtype(dtype)
        self.remat = remat
        self.blocks = nnx.List(
            [EncoderBlock(width, num_heads, mlp_dim, self.dtype, rngs) for _ in range(depth)]
        )
        self.ln_final = nnx.LayerNorm(width, dtype=self.dtype, param_dtype=PARAM_DTYPE, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Encodes ``x: [B, T, width]``; ``mask: bool[B, T]`` marks valid tokens."""
        x = x.astype(self.dtype)
        run = _run_block_remat if self.remat else _run_block
        for block in self.blocks:
            x = run(block, x, mask)
        return self.ln_final(x)


def _run_block(block: EncoderBlock, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    return block(x, mask)


# Rematerialisation: the backward pass recomputes each block's insides from its input, so
# only one [B, T, width] activation per block is kept (what makes b = 32k fit at 256px).
_run_block_remat = nnx.remat(_run_block)
