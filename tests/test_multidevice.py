"""The same training on 1 and on 2 simulated CPU devices gives the same losses and evals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow

SCRIPT = """
import json, sys
from jest_jax import config as config_lib, train
from jest_jax.metrics import read_metrics
data_dir, workdir = sys.argv[1], sys.argv[2]
c = config_lib.load("configs/smoke.py:steps=6")
for pool in (c.data.train, c.evals.zero_shot.data, c.evals.retrieval.data):
    pool.data_dir = data_dir
c.batch_size, c.evals.batch_size, c.logging.every_steps = 32, 32, 1
# JEST machinery without a reference run: hard_learner, matrix-free.
c.data.train.split = "raw"
c.selection.update(method="joint", criterion="hard_learner", filter_ratio=0.5,
                   num_chunks=4, implementation="matrix_free")
results = train.train(c, workdir)
rows = [r for r in read_metrics(workdir) if "loss" in r]
print("RESULT" + json.dumps({"losses": [r["loss"] for r in rows], "flops": rows[0]["flops"],
                             "score": [r.get("selection/score_selected") for r in rows],
                             "evals": results}))
"""


def _run(devices: int, data_dir: str, workdir: str) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, data_dir, workdir], env=env,
                         capture_output=True, text=True, timeout=1800,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


# Joint selection only: its step draws and shards the super-batch, selects, and trains on
# the selected batch, so it runs all that a uniform step runs, and more.
def test_one_and_two_devices_agree(data_dir, tmp_path):
    one = _run(1, data_dir, str(tmp_path / "one"))
    two = _run(2, data_dir, str(tmp_path / "two"))
    assert len(one["losses"]) == 6
    # Same batches, same init; only the reduction order across devices differs.
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=2e-4)
    # The same selections, hence the same selected-batch scores.
    np.testing.assert_allclose(two["score"], one["score"], rtol=2e-4)
    for key, value in one["evals"].items():
        assert two["evals"][key] == pytest.approx(value, abs=0.02), key
    # Logged FLOPs count the whole step (all devices): about the same, not halved.
    assert 0.9 < two["flops"] / one["flops"] < 1.5
