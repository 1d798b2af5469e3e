"""End-to-end training on the tiny embedded data: loss goes down, metrics and checkpoints
are written, a re-run resumes, a NaN stops the run, eval mode reads a checkpoint."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from jest_jax import train
from jest_jax.metrics import read_metrics

pytestmark = pytest.mark.slow


def test_short_run_lowers_loss_and_writes_outputs(tiny_config, tmp_path, capsys):
    tiny_config.total_steps = 100
    tiny_config.evals.every_steps = 50
    workdir = str(tmp_path / "run")
    results = train.train(tiny_config, workdir)
    out = capsys.readouterr().out
    assert re.search(r"\[ +100/100\] +[\d.]+ steps/s ETA 00:00 +loss=", out), out[-500:]
    evals = [r["step"] for r in read_metrics(workdir) if "zero_shot/color" in r]
    assert evals == [50, 100]  # periodic and final

    rows = [r for r in read_metrics(workdir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(5, 101, 5))
    first, last = rows[0]["loss"], np.mean([r["loss"] for r in rows[-2:]])
    # The best loss without telling pairs apart (one shared logit, sigmoid = 1/b) is
    # b * H(1/b); going clearly below it means the towers learned which pairs match.
    b = tiny_config.batch_size
    plateau = np.log(b) + (b - 1) * np.log(b / (b - 1))
    assert last < first and last < 0.95 * plateau, (first, last, plateau)
    assert all(0 <= r["data_wait"] <= 1 for r in rows)  # logged at every logging step
    flops = [r["flops"] for r in rows]
    assert flops[0] > 0 and np.allclose(np.diff(flops), flops[0])  # cumulative, constant/step
    assert all(r["flops/update"] == r["flops"] and r["flops/scoring"] == 0 for r in rows)
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))) == [80, 90, 100]
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert json.load(open(os.path.join(workdir, "config.json")))["batch_size"] == 32
    for key in ("zero_shot/shape", "zero_shot/color", "retrieval/i2t_r1", "retrieval/t2i_r10"):
        assert 0.0 <= results[key] <= 1.0
    final = json.load(open(os.path.join(workdir, "final_metrics.json")))
    assert final["step"] == 100 and final["zero_shot/color"] == results["zero_shot/color"]


def test_rerun_resumes_from_checkpoint(tiny_config, tmp_path, capsys):
    tiny_config.total_steps = 20
    workdir = str(tmp_path / "run")
    train.train(tiny_config, workdir, stop_at_step=10)  # as if the job died after step 10
    assert [r["step"] for r in read_metrics(workdir) if "loss" in r] == [5, 10]

    capsys.readouterr()
    train.train(tiny_config, workdir)  # the same command again
    assert "resuming from the checkpoint at step 10" in capsys.readouterr().out
    rows = [r for r in read_metrics(workdir) if "loss" in r]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]  # no step trained twice

    # An uninterrupted run draws the same batches with the same schedule: same losses.
    straight = str(tmp_path / "straight")
    train.train(tiny_config, straight)
    ref = [r["loss"] for r in read_metrics(straight) if "loss" in r]
    np.testing.assert_allclose([r["loss"] for r in rows], ref, rtol=1e-5)


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tiny_config, tmp_path):
    workdir = str(tmp_path / "run")
    tiny_config.total_steps = 10
    train.train(tiny_config, workdir)
    tiny_config.total_steps = 30
    tiny_config.optimizer.learning_rate = 1e30  # diverges within a few steps
    message = r"non-finite (selection scores|loss|gradients|updated state) at step 1\d \(loss="
    with pytest.raises(train.NonFiniteLossError, match=message):
        train.train(tiny_config, workdir)
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))) == [10]


def test_eval_mode_on_checkpoint(tiny_config, tmp_path):
    workdir = str(tmp_path / "run")
    tiny_config.total_steps = 10
    results = train.train(tiny_config, workdir)
    again = train.evaluate_checkpoint(tiny_config, workdir)
    assert again.keys() == results.keys()
    for k in results:
        assert again[k] == pytest.approx(results[k], abs=1e-6), k
    assert os.path.exists(os.path.join(workdir, "eval_step10.json"))
