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
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("override,message", [
    ("--config.batch_size=0", "error: config.batch_size=0 is invalid"),
    ("--config.selection.method=magic", "error: config.selection.method='magic' is invalid"),
    ("--config.model.patch_size=5", "error: config.model.patch_size=5 is invalid"),
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
