"""The batch-scoring kernel: super-batch → embeddings → scores → selected indices.

`SelectionSpec` is `config.selection`, validated and resolved. `Scorer` runs inside the
jitted train step (docs/design.md §2, stage 3): learner and reference forward passes in
inference mode on the N candidates, the criterion (with its context), and the selection
method, returning the `b` indices to train on, diagnostics and whether the scores were
usable. The reference is a `reference.ReferenceSource`: frozen params, the embedding
cache, or none.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections

from jest_jax import criteria, methods, selection
from jest_jax.fields import ConfigError, Section
from jest_jax.losses import Embeddings

IMPLEMENTATIONS = ("auto", "dense", "matrix_free")
# `auto` materialises S only for tiny super-batches, where either way costs well under 1%
# of a step and dense is the simpler program; above, matrix-free was faster at every size
# measured (1.03x at N=320 to 4.3x at N=16384 on CPU) and far smaller (docs/benchmarks.md).
DENSE_MAX_CANDIDATES = 256
# Folded into the seed's key so selection draws are independent of parameter init.
_SELECTION_STREAM = 0x5E1EC7

Embed = Callable[..., Embeddings]


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

    method: methods.SelectionMethod
    criterion: criteria.Bound
    num_select: int
    num_candidates: int
    implementation: str                 # dense | matrix_free ("auto" resolved)
    score_patch_size: int | None = None  # None: the learner's own patch size

    @staticmethod
    def defaults() -> ml_collections.ConfigDict:
        """The section's fields; `selection.reference` is `reference.ReferenceSpec`'s."""
        c = ml_collections.ConfigDict()
        c.method = "uniform"   # uniform (plain SigLIP) | independent | joint (JEST), or your own
        #                        "package.module:Class" (docs/design.md §4, "Selection method")
        c.method_args = ml_collections.ConfigDict()  # fields of your own method, checked by it
        c.criterion = "learnability"  # learnability | hard_learner | easy_reference,
        #                        or your own "package.module:function" (docs/selection.md)
        c.criterion_args = ml_collections.ConfigDict()  # keyword hyperparameters of the
        #                        criterion, checked against its signature
        c.filter_ratio = 0.0   # f: each step draws N = batch_size / (1 - f) candidates
        #                        and trains on batch_size of them (paper: 0.8)
        c.num_chunks = 16      # joint: the batch is drawn in this many chunks (paper: 16)
        c.score_gain = 1.0     # g: sampling p ∝ exp(g * score) (joint; independent/sample)
        c.sampling = "topk"    # independent: topk (deterministic) | sample (∝ exp(g*s))
        c.implementation = "auto"  # dense (N×N scores) | matrix_free | auto (dense up
        #                            to 256 candidates)
        c.score_patch_size = 0  # Flexi-JEST: score with the learner at this patch size
        #                         (0: model.patch_size); must divide data.image_size
        return c

    @classmethod
    def from_config(cls, section: Section, batch_size: int, image_size: int) -> SelectionSpec:
        name = section.get("method")
        try:
            method_cls = methods.REGISTRY.get(name)
        except ValueError as e:
            raise section.error("method", name, str(e)) from None
        ratio = section.number("filter_ratio", lambda v: 0 <= v < 1, "must be in [0, 1)")
        try:
            n = super_batch_size(batch_size, ratio)
        except ValueError as e:
            raise ConfigError(f"config.{section.field('filter_ratio')}={ratio!r} is invalid: "
                              f"{e}; choose f so that batch_size / (1 - f) is a whole "
                              "number") from None
        section.check(not method_cls.uses_scores or ratio > 0, "filter_ratio", ratio,
                      f"must be > 0 for method {name!r}: with 0 the super-batch is the batch "
                      "and there is nothing to select from (the paper uses 0.8)")
        # Fields some built-in methods share; checked whichever method is chosen.
        section.integer("num_chunks", 1)
        section.number("score_gain")
        section.choice("sampling", selection.SAMPLINGS)
        section.mapping("method_args")
        implementation = section.choice("implementation", IMPLEMENTATIONS)
        if implementation == "auto":
            implementation = "dense" if n <= DENSE_MAX_CANDIDATES else "matrix_free"
        patch = section.integer("score_patch_size", 0)
        section.check(patch == 0 or image_size % patch == 0, "score_patch_size", patch,
                      f"must be 0 or divide data.image_size={image_size}")
        criterion = section.get("criterion")
        try:
            bound = criteria.bind(criterion, section.mapping("criterion_args"),
                                  section.field("criterion_args"))
        except ConfigError:
            raise
        except ValueError as e:
            raise section.error("criterion", criterion, str(e)) from None
        method = method_cls.from_config(section, num_select=batch_size, num_candidates=n)
        return cls(method, bound, batch_size, n, implementation, patch or None)

    @property
    def active(self) -> bool:
        """False for plain SigLIP: uniform over a super-batch equal to the batch."""
        return self.method.uses_scores or self.num_candidates > self.num_select

    @property
    def needs_reference(self) -> bool:
        return self.method.uses_scores and criteria.needs_reference(self.criterion)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: jit keys on it
class Scorer:
    """Scores a super-batch and selects from it; pure, so it runs inside `jax.jit`.

    `embed_learner(params, batch, norms)` gives the learner's `Embeddings` of the
    candidates (at the scoring patch size); `reference.embed(reference_input, batch,
    norms)` the reference's, where `reference_input` is what the train step is handed
    (frozen params, the cache's t' and β, or nothing).
    """

    spec: SelectionSpec
    seed: int
    embed_learner: Embed
    reference: Any  # reference.ReferenceSource
    score_sharding: Any = None  # a dense score matrix's placement (rows over the devices)

    def key(self, step: jax.Array) -> jax.Array:
        """The selection key of `step`: a resumed run selects exactly what it would have."""
        return jax.random.fold_in(
            jax.random.fold_in(jax.random.key(self.seed), _SELECTION_STREAM), step)

    def context(self, batch: dict[str, jax.Array], step: jax.Array, learner: Embeddings,
                reference: Embeddings | None) -> criteria.Context:
        """Per-example vectors a criterion may read: the candidates' scalar fields, and
        the embedding norms of each model that computed them."""
        fields = {k: v for k, v in batch.items() if v.ndim == 1}
        for who, e in (("learner", learner), ("reference", reference)):
            if e is not None and e.image_norm is not None:
                fields[f"{who}_image_norm"] = e.image_norm
                fields[f"{who}_text_norm"] = e.text_norm
        return criteria.Context(step, fields)

    def scores(self, learner: Embeddings, reference: Embeddings | None,
               context: criteria.Context) -> selection.Scores:
        spec = self.spec
        if spec.implementation == "dense":
            return selection.DenseScores.compute(learner, reference, spec.criterion, context,
                                                 self.score_sharding)
        return selection.BlockScores(learner, reference, spec.criterion, context,
                                     block_size=spec.num_select)

    def score(self, params: Any, reference_input: Any, batch: dict[str, jax.Array],
              step: jax.Array | int = 0) -> tuple[selection.Scores, Embeddings,
                                                  Embeddings | None, criteria.Context]:
        """The super-batch `batch` scored as the step scores it: (S, dense or matrix-free
        as configured; the learner's and reference's embeddings; the criterion's context)."""
        spec = self.spec
        norms = spec.criterion.wants_context  # only a criterion with context reads them
        learner = self.embed_learner(params, batch, norms=norms)
        ref = (self.reference.embed(reference_input, batch, norms=norms)
               if spec.needs_reference else None)
        embedded = [learner.image, learner.text] + ([ref.image, ref.text] if ref else [])
        chex.assert_rank(embedded, 2)
        chex.assert_type(embedded, float)
        chex.assert_axis_dimension(learner.image, 0, spec.num_candidates)
        chex.assert_equal_shape_prefix(embedded, 1)
        context = self.context(batch, step, learner, ref)
        return self.scores(learner, ref, context), learner, ref, context

    def __call__(self, key: jax.Array, params: Any, reference_input: Any,
                 batch: dict[str, jax.Array], step: jax.Array | int = 0
                 ) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
        """(indices int32[b], diagnostics, scores usable) for the super-batch `batch`."""
        spec = self.spec
        select_key, random_key = jax.random.split(key)
        metrics: dict[str, jax.Array] = {}
        ok = jnp.array(True)
        if not spec.method.uses_scores:
            idx, _ = spec.method(select_key, None)
        else:
            scores, learner, ref, context = self.score(params, reference_input, batch, step)
            idx, used = spec.method(select_key, scores)
            if used is not None:
                ok = selection.scores_ok(used)
            metrics.update(self._diagnostics(random_key, idx, learner, ref, context))
        chex.assert_shape(idx, (spec.num_select,))
        chex.assert_type(idx, int)
        if "is_clean" in batch:
            metrics["selection/clean_super"] = jnp.mean(batch["is_clean"].astype(jnp.float32))
        return idx, metrics, ok

    def _diagnostics(self, key: jax.Array, idx: jax.Array, learner: Embeddings,
                     ref: Embeddings | None, context: criteria.Context) -> dict[str, jax.Array]:
        spec = self.spec
        # The baseline is a random sub-batch of the same size: batch scores grow with
        # batch size (off-diagonal sums), so the super-batch itself is no yardstick.
        baseline = selection.uniform_select(key, spec.num_candidates, spec.num_select)
        # Per example (S_ii, its score with its own caption): selected vs super-batch.
        diag = selection.diagonal_scores(learner, ref, spec.criterion, context)
        return {
            "selection/score_selected": selection.batch_score(learner, ref, spec.criterion,
                                                              idx, context),
            "selection/score_random": selection.batch_score(learner, ref, spec.criterion,
                                                            baseline, context),
            "selection/self_score_selected": diag[idx].mean(),
            "selection/self_score_super": diag.mean(),
        }
