"""Choosing the training sub-batch from a super-batch of N candidates (docs/design.md §1, §4).

All functions are pure and jittable, with no Python loop over examples; for a given
key they are deterministic and return distinct int32 indices in `[0, N)`.

The score matrix `S = criterion(pair^learner, pair^reference)` is served by a `Scores`
object in one of two ways, and every selection agrees index for index between them:
- `DenseScores`: S materialised (`N×N`); rows and columns are slices of it;
- `BlockScores`: S never built. Each request computes just its block of pair losses
  from the embeddings (memory `O(N·m)` for an `m`-row block).

`joint_select` (dense S given) and `joint_select_from_embeddings` (matrix-free) are the
joint sampler over each; `Scores` is what selection methods (`jest_jax.methods`) use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import chex
import jax
import jax.numpy as jnp

from jest_jax import criteria, losses
from jest_jax.criteria import Context
from jest_jax.losses import Embeddings

SAMPLINGS = ("topk", "sample")  # independent selection: deterministic top-b, or sampled
CriterionLike = str | criteria.Criterion | criteria.Bound

__all__ = ["Embeddings", "SAMPLINGS", "Scores", "DenseScores", "BlockScores"]


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
    raise ValueError(f"sampling={sampling!r} must be one of {list(SAMPLINGS)}")


def scores_ok(scores: jax.Array) -> jax.Array:
    """No NaN and no +inf. -inf is allowed: it is how a criterion says "never pick this"."""
    return ~jnp.any(jnp.isnan(scores) | (scores == jnp.inf))


class Scores(Protocol):
    """Access to the score matrix S of N candidates, whichever way it is computed."""

    num_candidates: int

    def diagonal(self) -> jax.Array:
        """S_ii: f[N]."""

    def rows(self, idx: jax.Array) -> jax.Array:
        """S[idx, :]: f[len(idx), N]."""

    def cols(self, idx: jax.Array) -> jax.Array:
        """S[:, idx]: f[N, len(idx)]."""

    def row_sums(self) -> jax.Array:
        """Σ_j S_ij, each candidate's score with the super-batch as negatives: f[N]."""


class DenseScores:
    """S materialised as one N×N matrix."""

    def __init__(self, matrix: jax.Array):
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"dense scores need a square score matrix f[N, N], got shape "
                             f"{matrix.shape}")
        self.matrix = matrix
        self.num_candidates = matrix.shape[0]

    @classmethod
    def compute(cls, learner: Embeddings, reference: Embeddings | None,
                criterion: CriterionLike, context: Context | None = None,
                sharding: jax.sharding.Sharding | None = None) -> DenseScores:
        """S from the embeddings; `sharding` places it (rows over the devices, so no
        device holds all of it)."""
        matrix = score_matrix(learner, reference, criterion, context)
        if sharding is not None:
            matrix = jax.lax.with_sharding_constraint(matrix, sharding)
        return cls(matrix)

    def diagonal(self) -> jax.Array:
        return jnp.diagonal(self.matrix)

    def rows(self, idx: jax.Array) -> jax.Array:
        return self.matrix[idx]

    def cols(self, idx: jax.Array) -> jax.Array:
        return self.matrix[:, idx]

    def row_sums(self) -> jax.Array:
        return self.matrix.sum(axis=1)


class BlockScores:
    """S computed block by block from the embeddings, never materialised.

    Per request four small matmuls give the learner's and reference's pair-loss block;
    `row_sums` walks the rows in blocks of `block_size` (memory O(N·block_size)).
    """

    def __init__(self, learner: Embeddings, reference: Embeddings | None,
                 criterion: CriterionLike, context: Context | None = None,
                 block_size: int = 1024):
        self.learner, self.reference = learner, reference
        self.criterion = criteria.bind(criterion)
        self.context = context or Context()
        self.num_candidates = learner.image.shape[0]
        self.block_size = min(block_size, self.num_candidates)

    def _apply(self, pair: Callable[[Embeddings], jax.Array], context: Context) -> jax.Array:
        return _apply(self.criterion, pair, self.learner, self.reference, context)

    def diagonal(self) -> jax.Array:
        return self._apply(_pair_diag, self.context.diag(self.num_candidates))

    def rows(self, idx: jax.Array) -> jax.Array:
        every = jnp.arange(self.num_candidates)
        return self._apply(lambda e: _pair_rows(e, idx), self.context.block(idx, every))

    def cols(self, idx: jax.Array) -> jax.Array:
        every = jnp.arange(self.num_candidates)
        return self._apply(lambda e: _pair_cols(e, idx), self.context.block(every, idx))

    def row_sums(self) -> jax.Array:
        n, size = self.num_candidates, self.block_size
        num_blocks = -(-n // size)
        # Pad the last block with row 0 and drop the padding after.
        rows = jnp.arange(num_blocks * size).reshape(num_blocks, size) % n
        sums = jax.lax.map(lambda idx: self.rows(idx).sum(1), rows)
        return sums.reshape(-1)[:n]


def _blocked_sample(key: jax.Array, scores: Scores, num_select: int, num_chunks: int,
                    score_gain: float) -> tuple[jax.Array, jax.Array]:
    """The paper's Algorithm 1 over any `Scores`.

    Returns (indices int32[num_select], conditionals f[num_chunks, N]), where
    `conditionals[k, i] = S_ii + Σ_{j chosen in chunks < k} (S_ji + S_ij)`.
    """
    diag = scores.diagonal()
    chex.assert_rank(diag, 1)
    chex.assert_type(diag, float)
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
        new = cond + scores.rows(idx).sum(axis=0) + scores.cols(idx).sum(axis=1)
        return (new, taken.at[idx].set(True)), (idx, diag + cond)

    init = (jnp.zeros_like(diag), jnp.zeros(n, bool))
    # The last chunk needs no conditional update, so it is drawn outside the scan.
    (cond, taken), (idx, conds) = jax.lax.scan(chunk, init, keys[:-1])
    last = draw(keys[-1], cond, taken)
    indices = jnp.concatenate([idx.reshape(-1), last])
    conditionals = jnp.concatenate([conds, (diag + cond)[None]])
    chex.assert_shape(indices, (num_select,))
    return indices, conditionals


def joint_sample(key: jax.Array, scores: Scores, num_select: int, num_chunks: int,
                 score_gain: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Joint (batch-level) selection over `scores`: (indices, every chunk's conditionals).

    Chunk 1 draws m = num_select / num_chunks indices with p ∝ exp(g·S_ii); chunk k
    draws m more among the rest with p ∝ exp(g·c_i), c_i = S_ii + Σ_{j chosen}(S_ji + S_ij).
    """
    return _blocked_sample(key, scores, num_select, num_chunks, score_gain)


def joint_select(key: jax.Array, scores: jax.Array, num_select: int, num_chunks: int,
                 score_gain: float = 1.0, return_conditionals: bool = False):
    """Joint selection from a dense score matrix `scores` f[N, N] (see `joint_sample`).
    With `return_conditionals`, also returns every chunk's c (f[num_chunks, N])."""
    out = joint_sample(key, DenseScores(scores), num_select, num_chunks, score_gain)
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


def _pair_all(e: Embeddings) -> jax.Array:
    return losses.sigmoid_pair_losses(e.image, e.text, e.log_temperature, e.bias)


def _apply(criterion: criteria.Bound, pair: Callable[[Embeddings], jax.Array],
           learner: Embeddings, reference: Embeddings | None, context: Context) -> jax.Array:
    """`criterion` on one block of pair losses of learner and reference."""
    if reference is None and criteria.needs_reference(criterion):
        raise ValueError(f"criterion {criterion.name!r} needs reference embeddings, but "
                         "reference is None")
    if reference is not None and reference.image.shape[0] != learner.image.shape[0]:
        raise ValueError(f"learner and reference embed different candidates: "
                         f"{learner.image.shape[0]} vs {reference.image.shape[0]}")
    losses_learner = pair(learner)
    scores = criterion(losses_learner, None if reference is None else pair(reference), context)
    if jnp.shape(scores) != losses_learner.shape:
        raise ValueError(f"criterion {criterion.name!r} returned shape {jnp.shape(scores)} "
                         f"for pair losses of shape {losses_learner.shape}; criteria must be "
                         "elementwise")
    return scores


def score_matrix(learner: Embeddings, reference: Embeddings | None,
                 criterion: CriterionLike, context: Context | None = None) -> jax.Array:
    """The dense score matrix S = criterion(pair^learner, pair^reference): f[N, N]."""
    chex.assert_rank([learner.image, learner.text], 2)
    every = jnp.arange(learner.image.shape[0])
    return _apply(criteria.bind(criterion), _pair_all, learner, reference,
                  (context or Context()).block(every, every))


def joint_select_from_embeddings(key: jax.Array, learner: Embeddings,
                                 reference: Embeddings | None, criterion: CriterionLike,
                                 num_select: int, num_chunks: int, score_gain: float = 1.0,
                                 return_conditionals: bool = False,
                                 context: Context | None = None):
    """`joint_select` without the N×N matrix: the same indices for the same key.

    `reference` may be None for criteria that need no reference. Per chunk, four
    matmuls give the learner's and reference's `m×N` rows and `N×m` columns.
    """
    scores = BlockScores(learner, reference, criterion, context)
    out = joint_sample(key, scores, num_select, num_chunks, score_gain)
    return out if return_conditionals else out[0]


def diagonal_scores(learner: Embeddings, reference: Embeddings | None,
                    criterion: CriterionLike, context: Context | None = None) -> jax.Array:
    """`S_ii` for every candidate (its score with its own caption): f[N], O(N·D)."""
    return BlockScores(learner, reference, criterion, context).diagonal()


def row_scores_from_embeddings(learner: Embeddings, reference: Embeddings | None,
                               criterion: CriterionLike, block_size: int = 1024,
                               context: Context | None = None) -> jax.Array:
    """Per-example scores for independent selection, `S.sum(axis=1)`, in row blocks
    of `block_size` (memory O(N·block_size), never N×N)."""
    return BlockScores(learner, reference, criterion, context, block_size).row_sums()


def batch_score(learner: Embeddings, reference: Embeddings | None,
                criterion: CriterionLike, idx: jax.Array,
                context: Context | None = None) -> jax.Array:
    """Score of the sub-batch `idx` as a batch: `Σ_{i,j ∈ idx} S_ij / len(idx)`
    (for hard_learner, exactly its SigLIP loss)."""
    chex.assert_rank(idx, 1)

    def pair(e: Embeddings) -> jax.Array:
        return losses.sigmoid_pair_losses(e.image[idx], e.text[idx], e.log_temperature, e.bias)

    block = (context or Context()).block(idx, idx)
    return _apply(criteria.bind(criterion), pair, learner, reference, block).sum() / idx.shape[0]
