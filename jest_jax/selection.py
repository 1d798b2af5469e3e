"""Choosing the training sub-batch from a super-batch of N candidates (DESIGN.md §1, §4).

All functions are pure and jittable, with no Python loop over examples; for a given
key they are deterministic and return distinct int32 indices in `[0, N)`.

Joint selection exists twice and both agree for the same key:
- `joint_select` on a dense score matrix `S` (`N×N`);
- `joint_select_from_embeddings`, which never builds `S`: each chunk computes the
  `m×N` row block and `N×m` column block of pair losses from the embeddings
  (memory `O(N·m)`, `m = num_select / num_chunks`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jest_jax import criteria, losses

Blocks = Callable[[jax.Array], tuple[jax.Array, jax.Array]]


class Embeddings(NamedTuple):
    """One model's view of a super-batch: L2-normalised embeddings, t' and β."""

    image: jax.Array            # f[N, D]
    text: jax.Array             # f[N, D]
    log_temperature: jax.Array  # f[]
    bias: jax.Array             # f[]


def check_sizes(num_candidates: int, num_select: int, num_chunks: int = 1) -> None:
    """Raise ValueError unless `num_chunks` divides `0 < num_select <= num_candidates`."""
    if not 0 < num_select <= num_candidates:
        raise ValueError(f"num_select={num_select} must be in [1, num_candidates="
                         f"{num_candidates}]")
    if num_chunks < 1 or num_select % num_chunks:
        raise ValueError(f"num_select={num_select} must be divisible by num_chunks={num_chunks}")


def uniform_select(key: jax.Array, num_candidates: int, num_select: int) -> jax.Array:
    """`num_select` distinct indices drawn uniformly at random (plain SigLIP)."""
    check_sizes(num_candidates, num_select)
    return jax.random.permutation(key, num_candidates)[:num_select].astype(jnp.int32)


def _gumbel_top_k(key: jax.Array, logits: jax.Array, k: int) -> jax.Array:
    """k draws without replacement with p ∝ exp(logits): top-k of logits + Gumbel noise."""
    noise = jax.random.gumbel(key, logits.shape, logits.dtype)
    return jax.lax.top_k(logits + noise, k)[1].astype(jnp.int32)


def independent_select(key: jax.Array, scores: jax.Array, num_select: int,
                       sampling: str = "topk", score_gain: float = 1.0) -> jax.Array:
    """Select by per-example `scores` f[N]: the top `num_select`, or (`sampling="sample"`)
    `num_select` draws without replacement with p ∝ exp(score_gain · score)."""
    if scores.ndim != 1:
        raise ValueError(f"independent_select needs per-example scores f[N], got shape "
                         f"{scores.shape}")
    check_sizes(scores.shape[0], num_select)
    if sampling == "topk":
        return jax.lax.top_k(scores, num_select)[1].astype(jnp.int32)
    if sampling == "sample":
        return _gumbel_top_k(key, score_gain * scores, num_select)
    raise ValueError(f"sampling={sampling!r} must be 'topk' or 'sample'")


def _blocked_sample(key: jax.Array, diag: jax.Array, blocks: Blocks, num_select: int,
                    num_chunks: int, score_gain: float) -> tuple[jax.Array, jax.Array]:
    """The paper's Algorithm 1, given the diagonal of S and a function returning the
    row block `S[idx, :]` and column block `S[:, idx]` of chosen indices.

    Returns (indices int32[num_select], conditionals f[num_chunks, N]), where
    `conditionals[k, i] = S_ii + Σ_{j chosen in chunks < k} (S_ji + S_ij)`.
    """
    n = diag.shape[0]
    check_sizes(n, num_select, num_chunks)
    m = num_select // num_chunks
    keys = jax.random.split(key, num_chunks)

    def draw(key, cond, taken):
        # Untaken scores are clamped to finite values so that only taken ones are -inf:
        # a criterion returning -inf (or NaN) must not tie with, and re-pick, taken ones.
        floor = jnp.finfo(diag.dtype).min / 4
        logits = jnp.nan_to_num(score_gain * (diag + cond), nan=floor, neginf=floor,
                                posinf=-floor)
        return _gumbel_top_k(key, jnp.where(taken, -jnp.inf, logits), m)

    def chunk(carry, key):
        cond, taken = carry
        idx = draw(key, cond, taken)
        rows, cols = blocks(idx)
        new = cond + rows.sum(axis=0) + cols.sum(axis=1)  # Σ_{j∈chunk} S_ji + S_ij
        return (new, taken.at[idx].set(True)), (idx, diag + cond)

    init = (jnp.zeros_like(diag), jnp.zeros(n, bool))
    # The last chunk needs no conditional update, so it is drawn outside the scan.
    (cond, taken), (idx, conds) = jax.lax.scan(chunk, init, keys[:-1])
    last = draw(keys[-1], cond, taken)
    indices = jnp.concatenate([idx.reshape(-1), last])
    conditionals = jnp.concatenate([conds, (diag + cond)[None]])
    return indices, conditionals


def joint_select(key: jax.Array, scores: jax.Array, num_select: int, num_chunks: int,
                 score_gain: float = 1.0, return_conditionals: bool = False):
    """Joint (batch-level) selection from a dense score matrix `scores` f[N, N].

    Chunk 1 draws m = num_select / num_chunks indices with p ∝ exp(g·S_ii); chunk k
    draws m more among the rest with p ∝ exp(g·c_i), c_i = S_ii + Σ_{j chosen}(S_ji + S_ij).
    With `return_conditionals`, also returns every chunk's c (f[num_chunks, N]).
    """
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"joint_select needs a square score matrix f[N, N], got shape "
                         f"{scores.shape}")
    out = _blocked_sample(key, jnp.diagonal(scores), lambda idx: (scores[idx], scores[:, idx]),
                          num_select, num_chunks, score_gain)
    return out if return_conditionals else out[0]


def _pair_rows(e: Embeddings, idx: jax.Array) -> jax.Array:
    """Rows `idx` of the N×N pair-loss matrix: f[len(idx), N]."""
    cols = jnp.arange(e.text.shape[0])
    return losses.pair_losses_block(e.image[idx], e.text, e.log_temperature, e.bias,
                                    losses.positive_mask(idx, cols))


def _pair_cols(e: Embeddings, idx: jax.Array) -> jax.Array:
    """Columns `idx` of the N×N pair-loss matrix: f[N, len(idx)]."""
    rows = jnp.arange(e.image.shape[0])
    return losses.pair_losses_block(e.image, e.text[idx], e.log_temperature, e.bias,
                                    losses.positive_mask(rows, idx))


def _pair_diag(e: Embeddings) -> jax.Array:
    """The diagonal (matched pairs) of the pair-loss matrix: f[N], as N 1×1 blocks."""
    one = jnp.ones((1, 1), bool)
    block = lambda x, y: losses.pair_losses_block(x[None], y[None], e.log_temperature,  # noqa: E731
                                                  e.bias, one)[0, 0]
    return jax.vmap(block)(e.image, e.text)


def _apply(criterion: criteria.Criterion, pair: Callable[[Embeddings], jax.Array],
           learner: Embeddings, reference: Embeddings | None) -> jax.Array:
    losses_learner = pair(learner)
    if reference is None and criteria.needs_reference(criterion):
        raise ValueError(f"criterion {getattr(criterion, '__name__', criterion)!r} needs "
                         "reference embeddings, but reference is None")
    if reference is not None and reference.image.shape[0] != learner.image.shape[0]:
        raise ValueError(f"learner and reference embed different candidates: "
                         f"{learner.image.shape[0]} vs {reference.image.shape[0]}")
    scores = criterion(losses_learner, None if reference is None else pair(reference))
    if jnp.shape(scores) != losses_learner.shape:
        raise ValueError(f"criterion {getattr(criterion, '__name__', criterion)!r} returned "
                         f"shape {jnp.shape(scores)} for pair losses of shape "
                         f"{losses_learner.shape}; criteria must be elementwise")
    return scores


def score_matrix(learner: Embeddings, reference: Embeddings | None,
                 criterion: str | criteria.Criterion) -> jax.Array:
    """The dense score matrix S = criterion(pair^learner, pair^reference): f[N, N]."""
    criterion = criteria.get(criterion)
    return _apply(criterion, lambda e: losses.sigmoid_pair_losses(*e), learner, reference)


def joint_select_from_embeddings(key: jax.Array, learner: Embeddings,
                                 reference: Embeddings | None,
                                 criterion: str | criteria.Criterion, num_select: int,
                                 num_chunks: int, score_gain: float = 1.0,
                                 return_conditionals: bool = False):
    """`joint_select` without the N×N matrix: the same indices for the same key.

    `reference` may be None for criteria that need no reference. Per chunk, four
    matmuls give the learner's and reference's `m×N` rows and `N×m` columns.
    """
    criterion = criteria.get(criterion)

    def blocks(idx):
        return (_apply(criterion, lambda e: _pair_rows(e, idx), learner, reference),
                _apply(criterion, lambda e: _pair_cols(e, idx), learner, reference))

    diag = _apply(criterion, _pair_diag, learner, reference)
    out = _blocked_sample(key, diag, blocks, num_select, num_chunks, score_gain)
    return out if return_conditionals else out[0]


def diagonal_scores(learner: Embeddings, reference: Embeddings | None,
                    criterion: str | criteria.Criterion) -> jax.Array:
    """`S_ii` for every candidate (its score with its own caption): f[N], O(N·D)."""
    return _apply(criteria.get(criterion), _pair_diag, learner, reference)


def row_scores_from_embeddings(learner: Embeddings, reference: Embeddings | None,
                               criterion: str | criteria.Criterion,
                               block_size: int = 1024) -> jax.Array:
    """Per-example scores for independent selection, `S.sum(axis=1)`, in row blocks
    of `block_size` (memory O(N·block_size), never N×N)."""
    criterion = criteria.get(criterion)
    n = learner.image.shape[0]
    block_size = min(block_size, n)
    num_blocks = -(-n // block_size)
    # Pad the last block with row 0 and drop the padding after.
    rows = jnp.arange(num_blocks * block_size).reshape(num_blocks, block_size) % n
    sums = jax.lax.map(
        lambda idx: _apply(criterion, lambda e: _pair_rows(e, idx), learner, reference).sum(1),
        rows)
    return sums.reshape(-1)[:n]


def batch_score(learner: Embeddings, reference: Embeddings | None,
                criterion: str | criteria.Criterion, idx: jax.Array) -> jax.Array:
    """Score of the sub-batch `idx` as a batch: `Σ_{i,j ∈ idx} S_ij / len(idx)`
    (for hard_learner, exactly its SigLIP loss)."""
    criterion = criteria.get(criterion)

    def pair(e: Embeddings) -> jax.Array:
        return losses.sigmoid_pair_losses(e.image[idx], e.text[idx], e.log_temperature, e.bias)

    return _apply(criterion, pair, learner, reference).sum() / idx.shape[0]
