"""experiments/study_chunks.py (the Fig. 2 study, docs/results.md): its reference search
and its batch objective, against brute force and NumPy float64."""

from __future__ import annotations

import itertools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jest_jax import selection
from jest_jax.losses import Embeddings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments"))
import study_chunks as study  # noqa: E402


def _brute_force(scores: np.ndarray, b: int) -> tuple[float, tuple[int, ...]]:
    """The most learnable batch by enumerating every one, float64."""
    best, arg = -np.inf, ()
    for batch in itertools.combinations(range(len(scores)), b):
        value = scores[np.ix_(batch, batch)].sum() / b
        if value > best:
            best, arg = value, batch
    return best, arg


@pytest.mark.parametrize("n, b, seed", [(10, 5, 0), (12, 6, 1), (14, 4, 2)])
def test_annealing_finds_the_brute_force_optimum(n, b, seed):
    rng = np.random.default_rng(seed)
    # Not symmetric, and a diagonal on another scale, like learnability's S.
    scores = rng.normal(size=(n, n)) + np.diag(rng.normal(0.0, 3.0, n))
    best, arg = _brute_force(scores, b)
    for polished in (True, False):  # the annealing gets there without the polish too
        found = study.anneal(scores, b, np.random.default_rng(seed), steps=3000, chains=8,
                             polished=polished)
        assert found["value"] == pytest.approx(best, abs=1e-12)
        assert tuple(found["idx"]) == arg
        assert found["value"] == pytest.approx(study.batch_learnability(scores, found["idx"]))
    # The random batches' mean is the exact expectation over all C(n, b) batches.
    every = np.array(list(itertools.combinations(range(n), b)))
    assert study.expected_random(scores, b) == pytest.approx(
        study.batch_learnability(scores, every).mean(), abs=1e-12)


def test_incremental_swap_update_equals_recomputation():
    rng = np.random.default_rng(3)
    n, b, chains = 20, 8, 5
    scores = rng.normal(size=(n, n))
    d, t = study.swap_terms(scores)
    inside = np.stack([rng.permutation(n) for _ in range(chains)])
    outside, inside = inside[:, b:].copy(), inside[:, :b].copy()
    members = np.zeros((chains, n), bool)
    members[np.arange(chains)[:, None], inside] = True
    g = study.pair_sums(t, members)
    totals = study.batch_learnability(scores, inside) * b
    rows = np.arange(chains)
    for _ in range(200):
        p, q = rng.integers(0, b, chains), rng.integers(0, n - b, chains)
        out, into = inside[rows, p], outside[rows, q]
        delta = study.swap_delta(d, t, g, out, into)
        study.apply_swap(g, t, out, into)
        inside[rows, p], outside[rows, q] = into, out
        totals += delta
        # Recomputed from scratch, in NumPy float64.
        direct = np.array([scores[np.ix_(c, c)].sum() for c in inside])
        np.testing.assert_allclose(totals, direct, rtol=0, atol=1e-10)
        members = np.zeros((chains, n), bool)
        members[rows[:, None], inside] = True
        np.testing.assert_allclose(g, members.astype(float) @ t, rtol=0, atol=1e-10)


def test_batch_learnability_is_the_librarys_batch_score():
    n, b, dim = 16, 6, 8
    keys = jax.random.split(jax.random.key(0), 4)

    def unit(key):
        x = jax.random.normal(key, (n, dim))
        return x / jnp.linalg.norm(x, axis=1, keepdims=True)

    learner = Embeddings(unit(keys[0]), unit(keys[1]), jnp.log(10.0), -5.0)
    reference = Embeddings(unit(keys[2]), unit(keys[3]), jnp.log(8.0), -4.0)
    scores32 = np.asarray(selection.score_matrix(learner, reference, "learnability"))
    scores = scores32.astype(np.float64)
    rng = np.random.default_rng(0)
    batches = study.random_batches(rng, n, b, 7)
    assert all(len(set(x)) == b for x in batches)
    ours = study.batch_learnability(scores, batches)
    library = jax.jit(jax.vmap(lambda idx: selection.batch_score(
        learner, reference, "learnability", idx)))(jnp.asarray(batches))
    for batch, value, lib in zip(batches, ours, np.asarray(library), strict=True):
        # The definition, cell by cell in float64.
        direct = sum(scores[i, j] for i in batch for j in batch) / b
        assert value == pytest.approx(direct, rel=1e-12)
        # The library's batch_score, from the embeddings (float32).
        assert value == pytest.approx(float(lib), rel=1e-5, abs=1e-5)
