"""Evaluator metrics against brute-force NumPy references."""

from __future__ import annotations

import numpy as np

from jest_jax.evaluate import recall_at_k, zero_shot_accuracy


def _recall_reference(sim: np.ndarray, k: int) -> float:
    hits = 0
    for i, row in enumerate(sim):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j != i))  # ties favour i
        hits += i in order[:k]
    return hits / len(sim)


def test_recall_at_k_matches_brute_force():
    rng = np.random.default_rng(0)
    for n in (1, 7, 40):
        sim = rng.normal(size=(n, n))
        sim[rng.random((n, n)) < 0.1] = 0.0  # some ties
        got = recall_at_k(sim, (1, 5, 10))
        for k in (1, 5, 10):
            assert got[f"r{k}"] == _recall_reference(sim, k)


def test_recall_perfect_and_worst():
    assert recall_at_k(np.eye(5) * 2 - 1, (1,))["r1"] == 1.0
    assert recall_at_k(-np.eye(5), (1, 4))["r1"] == 0.0


def test_zero_shot_accuracy():
    rng = np.random.default_rng(1)
    img, cls = rng.normal(size=(30, 8)), rng.normal(size=(4, 8))
    labels = rng.integers(0, 4, 30)
    expected = np.mean([np.argmax([img[i] @ c for c in cls]) == labels[i] for i in range(30)])
    assert zero_shot_accuracy(img, cls, labels) == expected
