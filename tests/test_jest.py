"""JEST inside the trainer: the reference, its cache, the scoring kernel and user criteria."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import doc_criteria, train_state
from jest_jax import build, sharding, train
from jest_jax.config import ConfigError
from jest_jax.metrics import read_metrics
from jest_jax.reference import NoReference, OnlineReference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _first_super_batch(run):
    return sharding.to_global(next(iter(train.train_data(run))), run.mesh)


def test_cached_and_online_reference_select_the_same(jest_config, tmp_path):
    online = build.build(jest_config)
    cached_config = jest_config.copy_and_resolve_references()
    cached_config.selection.reference.cache_dir = str(tmp_path / "cache")
    train.cache_reference(cached_config)
    cached = build.build(cached_config)
    assert cached.wired.reference.attach is not None
    assert isinstance(online.wired.reference, OnlineReference)

    batch_online = _first_super_batch(online)
    batch_cached = _first_super_batch(cached)
    np.testing.assert_array_equal(batch_online["index"], batch_cached["index"])
    # The cache holds exactly what the online reference computes for these examples.
    ref = online.wired.reference
    emb = ref.embed(ref.params, batch_online)
    np.testing.assert_allclose(batch_cached["ref_image"], emb.image, atol=2e-6)
    np.testing.assert_allclose(batch_cached["ref_text"], emb.text, atol=2e-6)
    # grain worker processes (data.num_workers) get the cache by its path, not a copy,
    # and attach the same embeddings.
    assert len(pickle.dumps(cached.wired.reference.attach)) < 10_000
    cached_config.data.num_workers = 2
    batch_workers = _first_super_batch(build.build(cached_config))
    for key in ("index", "ref_image", "ref_text", "image"):
        np.testing.assert_array_equal(batch_workers[key], batch_cached[key])

    params = online.state.init(0)["params"]
    for seed in range(3):
        key = jax.random.key(seed)
        idx_online, m_online, _ = jax.jit(online.wired.scorer)(
            key, params, online.wired.reference.step_input, batch_online)
        idx_cached, m_cached, _ = jax.jit(cached.wired.scorer)(
            key, params, cached.wired.reference.step_input, batch_cached)
        np.testing.assert_array_equal(idx_online, idx_cached)
        np.testing.assert_allclose(m_online["selection/score_selected"],
                                   m_cached["selection/score_selected"], rtol=1e-5)


@pytest.mark.slow
def test_cached_and_online_reference_runs_train_the_same(jest_config, tmp_path):
    jest_config.total_steps = 4
    jest_config.evals.every_steps = 0
    jest_config.logging.every_steps = 1
    train.train(jest_config, str(tmp_path / "online"))
    jest_config.selection.reference.cache_dir = str(tmp_path / "cache")
    train.cache_reference(jest_config)
    train.train(jest_config, str(tmp_path / "cached"))
    rows = {k: [r for r in read_metrics(str(tmp_path / k)) if "loss" in r]
            for k in ("online", "cached")}
    assert len(rows["online"]) == 4
    for a, b in zip(rows["online"], rows["cached"], strict=True):
        for key in ("loss", "selection/score_selected", "selection/self_score_selected",
                    "selection/clean_selected"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, err_msg=key)


def test_cache_errors_name_the_problem(jest_config, tmp_path):
    jest_config.selection.reference.cache_dir = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="holds no reference cache.*--mode cache"):
        build.build(jest_config)
    jest_config.selection.reference.cache_dir = str(tmp_path / "cache")
    train.cache_reference(jest_config)
    other = jest_config.copy_and_resolve_references()
    other.data.train.split = "curated"
    with pytest.raises(ConfigError, match="was made for .*raw.* but this run trains on"):
        build.build(other)


def test_reference_with_other_preprocessing_is_refused(jest_config):
    jest_config.data.image_size = 32
    with pytest.raises(ConfigError, match=r"reference was trained with data.image_size=16"):
        build.build(jest_config)


def test_reference_run_restores_params_only(jest_config, reference_workdir):
    """The online reference is the run's params, bitwise, and holds no optimizer state."""
    run = build.build(jest_config)
    ref = run.wired.reference
    assert isinstance(ref, OnlineReference) and set(ref.params) == set(run.state.abstract[
        "params"])
    saved = train_state(jest_config, reference_workdir, ref.step)
    for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(saved["params"]), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_dense_and_matrix_free_train_the_same(jest_config, tmp_path):
    jest_config.total_steps = 6
    jest_config.evals.every_steps = 0
    jest_config.logging.every_steps = 1
    rows = {}
    for impl in ("dense", "matrix_free"):
        jest_config.selection.implementation = impl
        train.train(jest_config, str(tmp_path / impl))
        rows[impl] = [r for r in read_metrics(str(tmp_path / impl)) if "loss" in r]
    assert len(rows["dense"]) == 6
    for a, b in zip(rows["dense"], rows["matrix_free"], strict=True):
        for key in ("loss", "selection/score_selected", "selection/clean_selected"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("method,criterion,ratio,patch", [
    ("joint", "learnability", 0.5, 8), ("independent", "easy_reference", 0.5, 0),
    ("independent", "hard_learner", 0.75, 0), ("uniform", "learnability", 0.5, 0)])
def test_every_method_trains_and_logs_diagnostics(jest_config, tmp_path, method, criterion,
                                                  ratio, patch):
    """All methods compile and log; the joint case also scores at another patch size."""
    jest_config.total_steps = 4
    jest_config.evals.every_steps = 0
    jest_config.logging.every_steps = 2
    jest_config.selection.update(method=method, criterion=criterion, filter_ratio=ratio,
                                 score_patch_size=patch)
    results = train.train(jest_config, str(tmp_path))
    assert "zero_shot/shape" in results
    row = [r for r in read_metrics(str(tmp_path)) if "loss" in r][-1]
    assert 0 <= row["selection/clean_selected"] <= 1 and 0 <= row["selection/clean_super"] <= 1
    assert np.isfinite(row["loss"]) and row["flops"] > 0
    # The update alone is a plain step on b; scoring is what selection adds to it.
    assert row["flops/update"] + row["flops/scoring"] == pytest.approx(row["flops"])
    assert row["flops/scoring"] > (0.5 * row["flops/update"] if method != "uniform" else -1)
    if method != "uniform":
        assert np.isfinite(row["selection/score_selected"])
        assert np.isfinite(row["selection/score_random"])
        assert np.isfinite(row["selection/self_score_selected"])
        assert np.isfinite(row["selection/self_score_super"])


def _doc_example(tmp_path) -> str:
    """The criterion module of docs/selection.md, written where Python can import it."""
    path = doc_criteria(tmp_path)
    module = (tmp_path / "my_criteria.py").read_text()
    assert "def capped_learnability" in module and "needs_reference = False" in module
    return path


@pytest.mark.slow
def test_user_criterion_from_the_docs_trains_end_to_end(jest_config, tmp_path, data_dir):
    """The documented command shape: a criterion named "module:function" on the CLI."""
    path = _doc_example(tmp_path)
    env = {**os.environ, "JEST_DATA_DIR": data_dir, "PYTHONPATH": path}
    overrides = [f"--config.selection.reference.workdir={jest_config.selection.reference.workdir}",
                 "--config.selection.criterion=my_criteria:capped_learnability",
                 "--config.selection.method=joint", "--config.selection.filter_ratio=0.5",
                 "--config.selection.num_chunks=4", "--config.data.train.split=raw",
                 "--config.logging.tensorboard=False", "--config.batch_size=32",
                 "--config.evals.batch_size=32"]
    result = subprocess.run(
        [sys.executable, "-m", "jest_jax.main", "--config", "configs/smoke.py:steps=4",
         "--workdir", str(tmp_path / "run"), *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-2000:]
    with open(tmp_path / "run" / "config.json") as f:
        assert json.load(f)["selection"]["criterion"] == "my_criteria:capped_learnability"
    rows = [r for r in read_metrics(str(tmp_path / "run")) if "loss" in r]
    assert rows[-1]["step"] == 4 and np.isfinite(rows[-1]["selection/score_selected"])


def test_user_criterion_without_reference_loads_none(jest_config, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(_doc_example(tmp_path))
    jest_config.selection.criterion = "my_criteria:low_learner_loss"
    jest_config.selection.reference.workdir = ""  # not needed, so not required
    run = build.build(jest_config)
    assert run.wired.scorer is not None and not run.wired.scorer.spec.needs_reference
    assert isinstance(run.wired.reference, NoReference)
