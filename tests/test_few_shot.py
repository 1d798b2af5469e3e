"""The few-shot linear probe: k shots per class drawn deterministically, a closed-form
ridge regression held against an independent NumPy float64 least-squares solution, and
the evaluator's numbers recomputed from the embeddings it returns."""

from __future__ import annotations

import numpy as np
import pytest

from jest_jax import build
from jest_jax.config import ConfigError, validate
from jest_jax.eval_metrics import few_shot_indices, ridge_probe_accuracy


def _reference_accuracy(train_x, train_y, test_x, test_y, classes, l2_reg) -> float:
    """Ridge with an unpenalised intercept as one augmented least-squares problem:
    rows [X 1] against Y, plus rows [sqrt(l2) I 0] against 0."""
    n, d = train_x.shape
    design = np.block([[train_x, np.ones((n, 1))],
                       [np.sqrt(l2_reg) * np.eye(d), np.zeros((d, 1))]])
    target = np.vstack([np.eye(classes)[train_y], np.zeros((d, classes))])
    theta = np.linalg.lstsq(design, target, rcond=None)[0]
    logits = np.hstack([test_x, np.ones((len(test_x), 1))]) @ theta
    return float(np.mean(logits.argmax(axis=1) == test_y))


def test_ridge_probe_matches_least_squares():
    rng = np.random.default_rng(0)
    for n, d, classes, l2 in ((12, 8, 3, 0.1), (40, 16, 5, 1.0), (9, 30, 3, 10.0)):
        centers = rng.normal(size=(classes, d))
        train_y, test_y = rng.integers(0, classes, n), rng.integers(0, classes, 200)
        train_x = centers[train_y] + rng.normal(size=(n, d))
        test_x = centers[test_y] + rng.normal(size=(200, d))
        got = ridge_probe_accuracy(train_x, train_y, test_x, test_y, classes, l2)
        assert got == _reference_accuracy(train_x, train_y, test_x, test_y, classes, l2)
        assert got > 1 / classes  # the clusters are learnable: not a constant guess


def test_few_shot_indices_draw_k_per_class():
    labels = np.repeat(np.arange(4), [5, 3, 7, 4])
    np.random.default_rng(1).shuffle(labels)
    for k in (1, 3):
        chosen = few_shot_indices(labels, k, seed=0)
        assert len(set(chosen.tolist())) == 4 * k
        assert np.bincount(labels[chosen]).tolist() == [k] * 4
        np.testing.assert_array_equal(chosen, few_shot_indices(labels, k, seed=0))
    assert any(not np.array_equal(few_shot_indices(labels, 3, s), few_shot_indices(labels, 3, 0))
               for s in range(1, 5))
    with pytest.raises(ValueError, match="class 1 has 3 examples, fewer than 4 shots"):
        few_shot_indices(labels, 4, seed=0)


def _config(tiny_config, **task):
    data_dir = tiny_config.data.train.data_dir
    del tiny_config.evals.zero_shot, tiny_config.evals.retrieval
    pool = dict(source="tfds", name="jest_shapes/tiny", data_dir=data_dir)
    tiny_config.evals.probe = dict(kind="few_shot", data=dict(pool, split="eval"),
                                   train_data=dict(pool, split="curated"), label_key="shape",
                                   shots=(1, 4), l2_reg=0.5, seed=3, **task)
    return tiny_config


def test_few_shot_evaluator_matches_numpy(tiny_config):
    run = build.build(_config(tiny_config), selection=False)
    params = run.state.init(0)["params"]
    results = run.evaluator.run(params)
    (task,) = run.spec.evals.tasks
    context = run.evaluator.context(params)
    train, test = context.split(task.train_data), context.split(task.data)
    assert set(results) == {"probe/1shot", "probe/4shot"}
    for k in (1, 4):
        chosen = few_shot_indices(train["shape"], k, seed=3)
        assert len(chosen) == 6 * k  # jest_shapes has 6 shapes
        expected = _reference_accuracy(train["image"][chosen].astype(np.float64),
                                       train["shape"][chosen], test["image"].astype(np.float64),
                                       test["shape"], 6, 0.5)
        assert results[f"probe/{k}shot"] == pytest.approx(expected)


def test_few_shot_config_errors(tiny_config):
    config = _config(tiny_config)
    config.evals.probe.shots = (1, 0)
    with pytest.raises(ConfigError, match=r"config.evals.probe.shots=\(1, 0\) is invalid"):
        validate(config)
    config.evals.probe.shots = (1,)
    config.evals.probe.label_key = "texture"
    with pytest.raises(ConfigError, match="config.evals.probe.label_key: jest_shapes/tiny:eval "
                                          "has no label feature 'texture'"):
        build.build(config, selection=False)
