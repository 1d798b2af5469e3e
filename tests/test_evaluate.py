"""Evaluator metrics against brute-force NumPy references."""

from __future__ import annotations

import numpy as np
import pytest

from jest_jax.eval_metrics import classification, multi_caption_recall, recall_at_k


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


def _rank_of(scores: list[float], correct: int) -> int:
    """Brute force: the correct item's place in a stable sort that puts it first among ties."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j != correct))
    return order.index(correct)


def test_classification_matches_brute_force():
    rng = np.random.default_rng(1)
    for n, classes in ((30, 4), (200, 12), (5, 1)):
        logits = rng.normal(size=(n, classes)).round(1)  # rounding makes ties
        labels = rng.integers(0, classes, n)
        got = classification(logits, labels, ks=(1, 5))
        ranks = [_rank_of(list(logits[i]), int(labels[i])) for i in range(n)]
        for k in (1, 5):
            assert got[f"top{k}"] == sum(r < k for r in ranks) / n
        per_class = [np.mean([ranks[i] == 0 for i in range(n) if labels[i] == c])
                     for c in sorted(set(labels.tolist()))]
        assert got["mean_per_class"] == float(np.mean(per_class))


def test_classification_rejects_labels_outside_the_classes():
    with pytest.raises(ValueError, match=r"label 3 is outside the 3 class names \[0, 3\)"):
        classification(np.zeros((2, 3)), np.array([0, 3]))


def test_multi_caption_recall_matches_brute_force():
    rng = np.random.default_rng(2)
    images, per_image = 13, (1, 2, 5, 3)
    caption_image = np.concatenate([[i] * per_image[i % 4] for i in range(images)])
    rng.shuffle(caption_image)  # captions in any order
    sim = rng.normal(size=(images, len(caption_image))).round(1)
    got = multi_caption_recall(sim, caption_image, (1, 5, 10))
    for k in (1, 5, 10):
        i2t = 0
        for i in range(images):
            # Sort the captions, own ones first among ties; a hit if any own one is in the top k.
            order = sorted(range(len(caption_image)),
                           key=lambda c, i=i: (-sim[i, c], caption_image[c] != i))
            i2t += any(caption_image[c] == i for c in order[:k])
        t2i = sum(_rank_of(list(sim[:, c]), int(caption_image[c])) < k
                  for c in range(len(caption_image)))
        assert got[f"i2t_r{k}"] == i2t / images
        assert got[f"t2i_r{k}"] == t2i / len(caption_image)
    # One caption per image, on the diagonal: the single-caption recall.
    square = rng.normal(size=(9, 9))
    single = multi_caption_recall(square, np.arange(9))
    assert single == {**{f"i2t_{k}": v for k, v in recall_at_k(square).items()},
                      **{f"t2i_{k}": v for k, v in recall_at_k(square.T).items()}}
    with pytest.raises(ValueError, match="image 2 has no caption"):
        multi_caption_recall(np.zeros((3, 2)), np.array([0, 1]))
