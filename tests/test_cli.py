"""The command line: a smoke run end to end, and bad configs rejected before any compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args: list[str], data_dir: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JEST_DATA_DIR": data_dir}
    return subprocess.run([sys.executable, "-m", "jest_jax.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)


@pytest.mark.parametrize("override,message", [
    ("--config.batch_size=0", "error: config.batch_size=0 is invalid"),
    ("--config.selection.method=magic", "error: config.selection.method='magic' is invalid"),
    ("--config.model.patch_size=5", "error: config.model.patch_size=5 is invalid"),
    # A string on the command line is a one-entry list: a set name, a file or a template.
    ("--config.evals.zero_shot.class_names=imagenett", "error: config.evals.zero_shot."
     "class_names='imagenett' is invalid: unknown class_names set (did you mean 'imagenet'?)"),
    ("--config.evals.zero_shot.templates=clip_imagenet", "error: config.evals.zero_shot."
     "templates='clip_imagenet' is invalid: unknown templates set (did you mean "
     "'clip_imagenet_80'?)"),
])
def test_bad_config_exits_with_message(tmp_path, data_dir, override, message):
    result = _run(["--config", "configs/smoke.py", "--workdir", str(tmp_path), override], data_dir)
    assert result.returncode == 1
    assert message in result.stderr
    assert not os.path.exists(tmp_path / "checkpoints")  # failed before training started


def test_unknown_override_is_rejected(tmp_path, data_dir):
    result = _run(["--config", "configs/smoke.py", "--workdir", str(tmp_path),
                   "--config.optimizer.lr=1"], data_dir)
    assert result.returncode != 0 and "lr" in result.stderr


@pytest.mark.slow
def test_smoke_config_trains_and_evaluates_from_the_cli(tmp_path, data_dir):
    workdir = str(tmp_path / "smoke")
    result = _run(["--config", "configs/smoke.py:steps=20", "--workdir", workdir], data_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "zero_shot/color" in result.stdout
    final = json.load(open(os.path.join(workdir, "final_metrics.json")))
    assert final["step"] == 20
    result = _run(["--config", "configs/smoke.py:steps=20", "--workdir", workdir,
                   "--mode", "eval"], data_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert os.path.exists(os.path.join(workdir, "eval_step20.json"))


@pytest.mark.slow
def test_bring_your_own_data_path_from_docs(tmp_path, data_dir):
    """docs/data.md: write a dataset with the converter, train on it with configs/custom.py."""
    import numpy as np

    from jest_jax.data import write_image_text_dataset

    def pairs(n, seed):
        rng = np.random.default_rng(seed)
        for i in range(n):
            yield {"image": rng.integers(0, 256, (48, 64, 3), dtype=np.uint8),
                   "caption": f"a photo of thing number {i}", "label": i % 2}

    mine = str(tmp_path / "my_datasets")
    write_image_text_dataset(mine, "my_pairs", {"train": pairs(100, 0), "test": pairs(20, 1)},
                             class_names=["cat", "dog"])
    workdir = str(tmp_path / "mine")
    result = _run(["--workdir", workdir, "--config",
                   f"configs/custom.py:name=my_pairs,data_dir={mine},eval_split=test,steps=4",
                   "--config.batch_size=16", "--config.evals.batch_size=16"], data_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    final = json.load(open(os.path.join(workdir, "final_metrics.json")))
    assert {"zero_shot/label", "retrieval/i2t_r1"} <= set(final)
    assert 0.0 <= final["zero_shot/label"] <= 1.0


def test_eval_split_typo_fails_before_training(tmp_path, data_dir):
    result = _run(["--config", "configs/smoke.py", "--workdir", str(tmp_path),
                   "--config.evals.retrieval.data.split=evl"], data_dir)
    assert result.returncode == 1
    assert "error: config.evals.retrieval.data: " in result.stderr and "evl" in result.stderr
    assert not os.path.exists(tmp_path / "checkpoints")


def test_train_mode_requires_a_workdir(data_dir):
    result = _run(["--config", "configs/smoke.py"], data_dir)
    assert result.returncode == 1
    assert "error: --workdir is required in train mode" in result.stderr


def test_cache_mode_writes_the_reference_cache(tmp_path, data_dir, reference_workdir):
    cache = tmp_path / "cache"
    result = _run(["--config", "configs/smoke.py", "--mode", "cache",
                   "--config.data.train.split=raw", "--config.selection.method=joint",
                   "--config.selection.filter_ratio=0.5", "--config.batch_size=32",
                   "--config.evals.batch_size=32",
                   f"--config.selection.reference.workdir={reference_workdir}",
                   f"--config.selection.reference.cache_dir={cache}"], data_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    with open(cache / "meta.json") as f:
        meta = json.load(f)
    assert meta["num_examples"] == 512 and meta["pool"]["split"] == "raw"
    assert meta["reference_step"] == 10
    assert meta["flops"] > 0  # the pass's XLA FLOPs, for compute-matched comparisons
    assert not os.path.exists(f"{cache}.partial")
