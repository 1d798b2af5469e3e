"""The batch-scoring kernel: super-batch → embeddings → scores → selected indices.

`Scorer` runs inside the jitted train step (DESIGN.md §2, stage 3): learner and
reference forward passes in inference mode on the N candidates, the criterion, and
the selection method, returning the `b` indices to train on and diagnostics. The
reference is either a frozen model (its params) or the reference embedding cache,
attached to each candidate by the input pipeline (`ref_image`, `ref_text`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jest_jax import criteria, selection
from jest_jax.selection import Embeddings

METHODS = ("uniform", "independent", "joint")
IMPLEMENTATIONS = ("auto", "dense", "matrix_free")
# `auto` materialises S only for tiny super-batches, where either way costs well under 1%
# of a step and dense is the simpler program; above, matrix-free was faster at every size
# measured (1.03x at N=320 to 4.3x at N=16384 on CPU) and far smaller (docs/benchmarks.md).
DENSE_MAX_CANDIDATES = 256
# Metric the train step's non-finite guard reads (and drops): were the scores usable?
SCORES_OK = "selection/scores_ok"

Embed = Callable[[Any, dict[str, jax.Array]], Embeddings]


def super_batch_size(batch_size: int, filter_ratio: float) -> int:
    """N = b / (1 - f); ValueError unless it is an integer."""
    if not 0 <= filter_ratio < 1:
        raise ValueError(f"filter_ratio={filter_ratio} must be in [0, 1)")
    n = batch_size / (1 - filter_ratio)
    if abs(n - round(n)) > 1e-6:
        raise ValueError(f"batch_size / (1 - filter_ratio) = {batch_size}/(1-{filter_ratio}) "
                         f"= {n:g} is not an integer")
    return int(round(n))


@dataclasses.dataclass(frozen=True)
class SelectionSpec:
    """`config.selection`, resolved: what to select, from how many, and how."""

    method: str
    criterion: criteria.Criterion
    num_select: int
    num_candidates: int
    num_chunks: int = 16
    score_gain: float = 1.0
    sampling: str = "topk"
    implementation: str = "dense"
    score_patch_size: int | None = None

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> SelectionSpec:
        s = config.selection
        n = super_batch_size(config.batch_size, s.filter_ratio)
        implementation = s.implementation
        if implementation == "auto":
            implementation = "dense" if n <= DENSE_MAX_CANDIDATES else "matrix_free"
        return cls(method=s.method, criterion=criteria.get(s.criterion),
                   num_select=config.batch_size, num_candidates=n, num_chunks=s.num_chunks,
                   score_gain=float(s.score_gain), sampling=s.sampling,
                   implementation=implementation, score_patch_size=s.score_patch_size or None)

    @property
    def active(self) -> bool:
        """False for plain SigLIP: uniform over a super-batch equal to the batch."""
        return self.method != "uniform" or self.num_candidates > self.num_select

    @property
    def needs_reference(self) -> bool:
        return self.method != "uniform" and criteria.needs_reference(self.criterion)


def select(spec: SelectionSpec, key: jax.Array, learner: Embeddings | None,
           reference: Embeddings | None,
           score_sharding: Any = None) -> tuple[jax.Array, jax.Array | None]:
    """The `spec.num_select` indices chosen by `spec.method` from the candidates, and the
    scores the choice was made from (None for uniform): per-example scores for
    independent selection, every chunk's conditional scores for joint selection.

    `score_sharding` places a dense N×N score matrix (split by rows over the devices, so
    no device holds all of it); the matrix-free path never builds one.
    """

    def dense_scores() -> jax.Array:
        scores = selection.score_matrix(learner, reference, spec.criterion)
        if score_sharding is None:
            return scores
        return jax.lax.with_sharding_constraint(scores, score_sharding)

    if spec.method == "uniform":
        return selection.uniform_select(key, spec.num_candidates, spec.num_select), None
    if spec.method == "independent":
        if spec.implementation == "dense":
            scores = dense_scores().sum(axis=1)
        else:
            scores = selection.row_scores_from_embeddings(
                learner, reference, spec.criterion, block_size=spec.num_select)
        return selection.independent_select(key, scores, spec.num_select, spec.sampling,
                                            spec.score_gain), scores
    if spec.implementation == "dense":
        return selection.joint_select(key, dense_scores(), spec.num_select, spec.num_chunks,
                                      spec.score_gain, return_conditionals=True)
    return selection.joint_select_from_embeddings(key, learner, reference, spec.criterion,
                                                  spec.num_select, spec.num_chunks,
                                                  spec.score_gain, return_conditionals=True)


def scores_ok(scores: jax.Array) -> jax.Array:
    """No NaN and no +inf. -inf is allowed: it is how a criterion says "never pick this"."""
    return ~jnp.any(jnp.isnan(scores) | (scores == jnp.inf))


@dataclasses.dataclass(frozen=True)
class Scorer:
    """Scores a super-batch and selects from it; pure, so it runs inside `jax.jit`.

    `embed_learner(params, batch)` and `embed_reference(reference, batch)` give the
    models' `Embeddings` of the candidates; `reference` is whatever the trainer passes
    (frozen params, or the cache's t' and β).
    """

    spec: SelectionSpec
    embed_learner: Embed
    embed_reference: Embed | None = None
    score_sharding: Any = None  # a dense score matrix's placement (rows over the devices)

    def __call__(self, key: jax.Array, params: Any, reference: Any,
                 batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(indices int32[b], diagnostics) for the super-batch `batch` of N candidates."""
        spec = self.spec
        select_key, random_key = jax.random.split(key)
        metrics: dict[str, jax.Array] = {}
        if spec.method == "uniform":
            idx, _ = select(spec, select_key, None, None)
        else:
            learner = self.embed_learner(params, batch)
            ref = self.embed_reference(reference, batch) if spec.needs_reference else None
            idx, scores = select(spec, select_key, learner, ref, self.score_sharding)
            metrics[SCORES_OK] = scores_ok(scores)
            # The baseline is a random sub-batch of the same size: batch scores grow with
            # batch size (off-diagonal sums), so the super-batch itself is no yardstick.
            baseline = selection.uniform_select(random_key, spec.num_candidates,
                                                spec.num_select)
            metrics["selection/score_selected"] = selection.batch_score(
                learner, ref, spec.criterion, idx)
            metrics["selection/score_random"] = selection.batch_score(
                learner, ref, spec.criterion, baseline)
            # Per example (S_ii, its score with its own caption): selected vs super-batch.
            diag = selection.diagonal_scores(learner, ref, spec.criterion)
            metrics["selection/self_score_selected"] = diag[idx].mean()
            metrics["selection/self_score_super"] = diag.mean()
        if "is_clean" in batch:
            metrics["selection/clean_super"] = jnp.mean(batch["is_clean"].astype(jnp.float32))
        return idx, metrics
