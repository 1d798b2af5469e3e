"""Extending jest_jax from outside the package (docs/design.md §5), through the CLI: a
data source, an evaluator and a selection method that a user module registers
(tests/extension_toys.py), and the criteria with arguments and context of
docs/selection.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, doc_criteria
from jest_jax import config as config_lib
from jest_jax import train
from jest_jax.metrics import read_metrics

TESTS = os.path.join(ROOT, "tests")

TOY_CONFIG = """
import extension_toys  # registers toy_pairs, brute_force_recall and top_self_score
from jest_jax import config as jj


def toy(seed, n):
    return dict(source="toy_pairs", num_examples=n, seed=seed, size=16)


def get_config():
    c = jj.load({smoke!r} + ":steps=4")
    c.batch_size, c.evals.batch_size = 32, 32
    c.data.train = toy(0, 128)
    c.evals.zero_shot.data, c.evals.zero_shot.label_keys = toy(1, 64), ("label",)
    c.evals.retrieval.data = toy(1, 64)
    c.evals.toy = dict(kind="brute_force_recall", data=toy(1, 64))
    c.selection.update(method="top_self_score", criterion="hard_learner", filter_ratio=0.5)
    c.selection.method_args = dict(sign=1)
    c.logging.every_steps, c.logging.tensorboard = 1, False
    return c
"""

JSON_CONFIG = """
import json
import ml_collections
def get_config():
    return ml_collections.ConfigDict(json.loads({!r}))
"""


def _cli(config_file, workdir, data_dir, *paths) -> subprocess.CompletedProcess:
    env = {**os.environ, "JEST_DATA_DIR": data_dir,
           "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "jest_jax.main", "--config", str(config_file),
                           "--workdir", str(workdir)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1800)


@pytest.mark.slow
def test_user_source_evaluator_and_method_train_through_the_cli(tmp_path, data_dir):
    config_file = tmp_path / "toy_config.py"
    config_file.write_text(TOY_CONFIG.format(smoke=os.path.join(ROOT, "configs", "smoke.py")))
    result = _cli(config_file, tmp_path / "run", data_dir, TESTS)
    assert result.returncode == 0, result.stderr[-3000:]

    import extension_toys  # after the run: the test process registers them too

    final = json.load(open(tmp_path / "run" / "final_metrics.json"))
    # The evaluator: its brute-force recall is the built-in retrieval's, on the same split.
    assert final["toy/i2t_r1"] == final["retrieval/i2t_r1"]
    # The source: its float field went through the pipeline to the evaluator unchanged.
    pool = extension_toys.ToyPairs(64, 1, 16).open()
    assert final["toy/mean_quality"] == pytest.approx(
        np.mean([pool[i]["quality"] for i in range(64)]), rel=1e-6)
    assert 0.0 <= final["zero_shot/label"] <= 1.0  # class names from the source
    # The method: the top-b by S_ii beats the super-batch's mean S_ii at every step.
    rows = [r for r in read_metrics(str(tmp_path / "run")) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["selection/self_score_selected"] > r["selection/self_score_super"], r
    saved = json.load(open(tmp_path / "run" / "config.json"))
    assert saved["data"]["train"]["source"] == "toy_pairs"
    assert saved["selection"]["method"] == "top_self_score"


def test_unknown_user_extensions_are_named(tiny_config, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(TESTS)
    import extension_toys  # noqa: F401  registers the toys

    tiny_config.selection.update(method="top_self_score", criterion="hard_learner",
                                 filter_ratio=0.5)
    tiny_config.selection.method_args = dict(sign=2)
    with pytest.raises(config_lib.ConfigError,
                       match=r"config.selection.method_args.sign=2 is invalid: must be one of"):
        config_lib.validate(tiny_config)
    tiny_config.selection.method_args = {}
    tiny_config.data.train = dict(source="toy_pairs", num_examples=64, seed=0, size=16,
                                  colours=3)
    with pytest.raises(config_lib.ConfigError,
                       match=r"config.data.train.colours is not a known field \(typo\?\); "
                             r"the fields of config.data.train are \['num_examples', 'seed', "
                             r"'size', 'source'\]"):
        config_lib.validate(tiny_config)
    tiny_config.data.train = dict(source="no_such_module:Source")
    with pytest.raises(config_lib.ConfigError,
                       match=r"config.data.train.source='no_such_module:Source' is invalid: .*"
                             r"cannot import 'no_such_module'"):
        config_lib.validate(tiny_config)
    tiny_config.data.train = dict(source="tfds", name="jest_shapes/tiny", split="raw",
                                  data_dir=str(tmp_path))
    tiny_config.evals.mine = dict(kind="extension_toys:NoSuchEvaluator")
    with pytest.raises(config_lib.ConfigError,
                       match=r"config.evals.mine='extension_toys:NoSuchEvaluator' is invalid: "
                             r".*has no Class 'NoSuchEvaluator'"):
        config_lib.validate(tiny_config)


@pytest.mark.slow
def test_criterion_with_arguments_and_a_metadata_prior_from_the_docs(jest_config, tmp_path,
                                                                     data_dir):
    """docs/selection.md's prior, on jest_shapes' `is_clean` with a large weight, through
    the CLI: joint selection then takes every clean candidate before any other."""
    jest_config.total_steps = 4
    jest_config.evals.every_steps = 0
    jest_config.logging.every_steps = 1
    jest_config.selection.criterion = "my_criteria:learnability_with_prior"
    jest_config.selection.criterion_args = dict(field="is_clean", weight=100.0)
    config_file = tmp_path / "config.py"
    config_file.write_text(JSON_CONFIG.format(jest_config.to_json()))
    result = _cli(config_file, tmp_path / "run", data_dir, doc_criteria(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [r for r in read_metrics(str(tmp_path / "run")) if "loss" in r]
    assert len(rows) == 4
    b, n = jest_config.batch_size, 2 * jest_config.batch_size  # f = 0.5
    for r in rows:
        clean = round(r["selection/clean_super"] * n)
        assert round(r["selection/clean_selected"] * b) == min(b, clean), r


@pytest.mark.slow
def test_criterion_with_a_margin_from_the_docs_trains(jest_config, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(doc_criteria(tmp_path))
    jest_config.total_steps = 3
    jest_config.evals.every_steps = 0
    jest_config.logging.every_steps = 1
    jest_config.selection.criterion = "my_criteria:learnability_with_margin"
    jest_config.selection.criterion_args = dict(margin=0.05)
    train.train(jest_config, str(tmp_path / "run"))
    rows = [r for r in read_metrics(str(tmp_path / "run")) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["selection/score_selected"]) for r in rows)
    jest_config.selection.criterion_args = dict(margn=0.05)
    with pytest.raises(config_lib.ConfigError, match=r"criterion_args.margn=0.05 is invalid: "
                                                     r".*\(did you mean 'margin'\?\)"):
        config_lib.validate(jest_config)
    jest_config.selection.criterion_args = {}
    with pytest.raises(config_lib.ConfigError,
                       match=r"config.selection.criterion_args is missing \['margin'\]"):
        config_lib.validate(jest_config)
