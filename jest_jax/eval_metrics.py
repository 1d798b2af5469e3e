"""Evaluation metrics on host embeddings (NumPy): classification top-k and mean per-class
accuracy, recall@k for one or many captions per image, and the few-shot ridge probe.

Pure functions of arrays, so that each is tested against a brute-force reference; the
evaluators in `jest_jax.evaluate` feed them. Ties always count in favour of the correct
answer (a rank is the number of strictly better wrong answers).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RECALL_AT = (1, 5, 10)
TOP_K = (1, 5)


def classification(logits: np.ndarray, labels: np.ndarray,
                   ks: Sequence[int] = TOP_K) -> dict[str, float]:
    """`top<k>` accuracy for each k and `mean_per_class` (top-1 averaged over the classes
    present in `labels`), for `logits` f[n, classes] and int `labels` [n]."""
    labels = np.asarray(labels).astype(np.int64)
    classes = logits.shape[1]
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        bad = labels[(labels < 0) | (labels >= classes)][0]
        raise ValueError(f"label {bad} is outside the {classes} class names [0, {classes})")
    correct = np.take_along_axis(logits, labels[:, None], axis=1)
    rank = (logits > correct).sum(axis=1)
    out = {f"top{k}": float(np.mean(rank < k)) for k in ks}
    present = np.unique(labels)
    out["mean_per_class"] = float(np.mean([np.mean(rank[labels == c] == 0) for c in present]))
    return out


def recall_at_k(similarity: np.ndarray, ks: Sequence[int] = RECALL_AT) -> dict[str, float]:
    """Row i's correct column is i; returns the fraction of rows ranking it in the top k."""
    correct = np.diagonal(similarity)[:, None]
    rank = (similarity > correct).sum(axis=1)  # ties resolved in favour of the correct item
    return {f"r{k}": float(np.mean(rank < k)) for k in ks}


def multi_caption_recall(similarity: np.ndarray, caption_image: np.ndarray,
                         ks: Sequence[int] = RECALL_AT) -> dict[str, float]:
    """Recall@k with several captions per image (the COCO / Flickr30k protocol).

    `similarity` is f[images, captions]; `caption_image[c]` is the image caption c
    describes. Image→text (`i2t_r<k>`): image i is a hit when any of its captions is among
    its k best-scoring captions, i.e. fewer than k other images' captions beat its best
    own one. Text→image (`t2i_r<k>`): each caption against all images.
    """
    caption_image = np.asarray(caption_image).astype(np.int64)
    images = similarity.shape[0]
    own = caption_image[None, :] == np.arange(images)[:, None]  # [images, captions]
    if not own.any(axis=1).all():
        raise ValueError(f"image {int(np.argmin(own.any(axis=1)))} has no caption")
    best_own = np.where(own, similarity, -np.inf).max(axis=1, keepdims=True)
    i2t_rank = ((similarity > best_own) & ~own).sum(axis=1)
    correct = similarity[caption_image, np.arange(similarity.shape[1])]
    t2i_rank = (similarity > correct[None, :]).sum(axis=0)
    return {**{f"i2t_r{k}": float(np.mean(i2t_rank < k)) for k in ks},
            **{f"t2i_r{k}": float(np.mean(t2i_rank < k)) for k in ks}}


def few_shot_indices(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """`shots` distinct examples of every class present in `labels`, drawn at random by
    `seed` (the same for every k: a pure function of labels, shots and seed), sorted.
    ValueError naming the class when one has fewer than `shots` examples."""
    labels = np.asarray(labels).astype(np.int64)
    rng = np.random.default_rng((seed, shots))
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < shots:
            raise ValueError(f"class {c} has {len(members)} examples, fewer than {shots} shots")
        chosen.append(rng.choice(members, shots, replace=False))
    return np.sort(np.concatenate(chosen))


def ridge_probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                         test_y: np.ndarray, num_classes: int, l2_reg: float) -> float:
    """Accuracy on the test set of closed-form ridge regression onto one-hot targets.

    Minimises |X W + 1 b - Y|^2 + l2_reg |W|^2 (the intercept b unpenalised, by
    centring), in float64; predicts the class of the largest output.
    """
    x = np.asarray(train_x, np.float64)
    mean_x = x.mean(axis=0)
    x = x - mean_x
    y = np.eye(num_classes)[np.asarray(train_y).astype(np.int64)]
    mean_y = y.mean(axis=0)
    w = np.linalg.solve(x.T @ x + l2_reg * np.eye(x.shape[1]), x.T @ (y - mean_y))
    logits = (np.asarray(test_x, np.float64) - mean_x) @ w + mean_y
    return float(np.mean(np.argmax(logits, axis=1) == np.asarray(test_y)))
