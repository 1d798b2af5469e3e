"""Contrastive losses on L2-normalised embeddings (rows = images, cols = texts).

The pair-loss formula lives in ``pair_losses_block`` only; the dense matrix,
the matrix-free selection blocks and the batch loss are all built on it. ``Loss``
is the component that reads ``config.loss`` and computes the configured batch loss.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec as P

from jest_jax.fields import Section

NAMES = ("sigmoid", "softmax")
IMPLEMENTATIONS = ("dense", "chunked")


class Embeddings(NamedTuple):
    """One model's view of a batch: L2-normalised embeddings, t' and β.

    The norms (before normalisation) are per-example terms a criterion may read; they
    are only computed when one asks for them, else None.
    """

    image: jax.Array            # f[N, D]
    text: jax.Array             # f[N, D]
    log_temperature: jax.Array  # f[]
    bias: jax.Array             # f[]
    image_norm: jax.Array | None = None  # f[N]
    text_norm: jax.Array | None = None   # f[N]


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
    chex.assert_rank([img_rows, txt_cols, is_positive], 2)
    chex.assert_type([img_rows, txt_cols], float)
    chex.assert_type(is_positive, bool)
    chex.assert_equal_shape_suffix([img_rows, txt_cols], 1)
    chex.assert_shape(is_positive, (img_rows.shape[0], txt_cols.shape[0]))
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
    chex.assert_equal_shape([img, txt])
    n = img.shape[0]
    return pair_losses_block(img, txt, log_temperature, bias, jnp.eye(n, dtype=bool))


def sigmoid_loss(
    img: jax.Array, txt: jax.Array, log_temperature: jax.Array, bias: jax.Array
) -> jax.Array:
    """SigLIP batch loss: the sum of all pair losses divided by N."""
    pair = sigmoid_pair_losses(img, txt, log_temperature, bias)
    return pair.sum() / img.shape[0]


def sigmoid_loss_chunked(
    img: jax.Array,
    txt: jax.Array,
    log_temperature: jax.Array,
    bias: jax.Array,
    mesh: jax.sharding.Mesh,
    axes: tuple[str, ...] | None = None,
) -> jax.Array:
    """``sigmoid_loss`` computed blockwise across devices, never forming the B×B logits.

    The chunked SigLIP implementation of Zhai et al. 2023 ("Sigmoid Loss for
    Language Image Pre-Training", §3.3): the batch's leading dimension is split
    over the ``d`` devices of mesh ``axes`` (default: all of ``mesh.axis_names``,
    as the trainer shards batches). Each device keeps its ``B/d`` image rows and
    scores them against one ``B/d`` text chunk at a time, passing the text chunk
    round a ring with ``ppermute``. The sigmoid loss is a sum of independent pair
    terms, so no softmax normaliser has to be gathered first.

    Memory: a device holds one ``(B/d)×(B/d)`` block of logits at a time, instead
    of ``B×B`` (or the ``(B/d)×B`` row block of a sharded dense loss); the
    backward pass recomputes the blocks and keeps only the ``d-1`` received text
    chunks, ``O(B·D)``. Communication: ``d-1`` ppermutes of a ``(B/d)×D`` text
    chunk forward, as many backward (ppermute transposes to the reverse ring),
    and one scalar ``psum``. The loop is a ``fori_loop``, so the program has one
    block matmul whatever ``d``.

    Value and gradients equal ``sigmoid_loss`` on the global arrays.
    ``log_temperature`` and ``bias`` are replicated scalars.
    """
    axes = tuple(mesh.axis_names) if axes is None else tuple(axes)
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown:
        raise ValueError(f"axes {unknown} not in mesh axes {mesh.axis_names}")
    num_devices = math.prod(mesh.shape[a] for a in axes)
    batch = img.shape[0]
    if batch % num_devices or txt.shape[0] != batch:
        raise ValueError(
            f"batch {img.shape[0]} (texts {txt.shape[0]}) must be equal and divisible by "
            f"the {num_devices} devices of mesh axes {axes}"
        )
    # Positives sit only in the first block (each device's own texts); after
    # that, any single cycle through the devices visits every other chunk once.
    # So the ring needs no particular device order, whichever way ppermute
    # linearises a tuple of axes.
    ring = [(i, (i + 1) % num_devices) for i in range(num_devices)]

    # Rematerialised in the backward pass: otherwise the loop would keep every
    # iteration's block for it, (d-1)·(B/d)² values, and the memory saving would
    # hold for the forward pass only.
    block_sum = jax.checkpoint(lambda *args: pair_losses_block(*args).sum())

    def local(img_rows, txt_rows, t, b):
        m = img_rows.shape[0]
        own = block_sum(img_rows, txt_rows, t, b, jnp.eye(m, dtype=bool))
        negatives = jnp.zeros((m, m), dtype=bool)

        def step(_, carry):
            total, chunk = carry
            chunk = jax.lax.ppermute(chunk, axes, ring)
            return total + block_sum(img_rows, chunk, t, b, negatives), chunk

        total, _ = jax.lax.fori_loop(0, num_devices - 1, step, (own, txt_rows))
        return jax.lax.psum(total, axes) / batch

    rows = P(axes)
    return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, P(), P()), out_specs=P())(
        img, txt, jnp.asarray(log_temperature), jnp.asarray(bias)
    )


def softmax_loss(img: jax.Array, txt: jax.Array, log_temperature: jax.Array) -> jax.Array:
    """CLIP loss: mean of the image→text and text→image cross-entropies."""
    chex.assert_rank([img, txt], 2)
    chex.assert_equal_shape([img, txt])
    img = img.astype(jnp.float32)
    txt = txt.astype(jnp.float32)
    logits = jnp.exp(jnp.asarray(log_temperature, jnp.float32)) * (img @ txt.T)
    img_to_txt = jnp.diagonal(jax.nn.log_softmax(logits, axis=1))
    txt_to_img = jnp.diagonal(jax.nn.log_softmax(logits, axis=0))
    return -0.5 * (img_to_txt.mean() + txt_to_img.mean())


@dataclasses.dataclass(frozen=True)
class Loss:
    """`config.loss`: which contrastive loss a batch trains on, and how it is computed."""

    name: str
    implementation: str

    @staticmethod
    def defaults() -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        c.name = "sigmoid"               # sigmoid (SigLIP) | softmax (CLIP)
        c.implementation = "dense"       # sigmoid only. dense: the global B×B logits; chunked:
        #                                  text embeddings travel round the devices (ppermute
        #                                  ring), each holds (B/d)² logits at a time. Same value
        return c

    @classmethod
    def from_config(cls, section: Section) -> Loss:
        name = section.choice("name", NAMES)
        implementation = section.choice("implementation", IMPLEMENTATIONS)
        section.check(implementation == "dense" or name == "sigmoid", "implementation",
                      implementation, "'chunked' exists for the sigmoid loss only; use 'dense'")
        return cls(name, implementation)

    def __call__(self, e: Embeddings, mesh: jax.sharding.Mesh) -> jax.Array:
        """The loss of a batch of aligned pairs; `mesh` places the chunked variant's ring."""
        if self.name == "softmax":
            return softmax_loss(e.image, e.text, e.log_temperature)
        if self.implementation == "chunked":
            # Texts travel round the devices; no device holds the global B×B logits.
            return sigmoid_loss_chunked(e.image, e.text, e.log_temperature, e.bias, mesh)
        return sigmoid_loss(e.image, e.text, e.log_temperature, e.bias)
