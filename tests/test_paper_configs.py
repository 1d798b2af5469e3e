"""The paper-scale configs compile, train step and scoring kernel, for a 256-device mesh of
simulated CPU devices, from abstract arrays only (nothing of that size is allocated)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest

from conftest import load_config
from jest_jax import config as config_lib
from jest_jax.models import Model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2**30
# Parameter counts of SigLIP's towers with a 32k vocabulary (Zhai et al. 2023, Table 7).
SIGLIP_PARAMS_M = {"B": 203, "L": 652}


def _compile(config: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=256"}
    out = subprocess.run([sys.executable, "experiments/compile_paper.py", "--config", config],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(report))  # the per-device memory, for the log (docs/benchmarks.md)
    return report


@pytest.mark.parametrize("model", ["B", "L"])
def test_paper_configs_are_the_papers_and_validate(model, tmp_path):
    (tmp_path / "checkpoints" / "100").mkdir(parents=True)
    c = load_config("paper/jest.py", f"model={model},reference={tmp_path}")
    config_lib.validate(c, num_devices=256)
    assert (c.batch_size, c.data.image_size, c.data.text_len, c.model.patch_size) == (
        32768, 256, 16, 16)
    assert load_config("paper/jest.py", f"model={model},text_len=64").data.text_len == 64
    assert (c.selection.filter_ratio, c.selection.num_chunks) == (0.8, 16)
    o = c.optimizer
    assert (o.learning_rate, o.warmup_fraction, o.b2, o.weight_decay, o.clip_norm) == (
        1e-3, 0.01, 0.95, 1e-4, 1.0)
    assert load_config("paper/siglip.py", f"model={model}").selection.method == "uniform"
    # The towers have SigLIP's size with its 32k vocabulary (counted without allocating;
    # the slow test below compiles B for 256 devices).
    spec = config_lib.validate(c, num_devices=256, check_files=False)
    params = Model(spec.model, vocab_size=32_000).abstract_params()
    count = sum(x.size for x in jax.tree.leaves(params)) / 1e6
    assert count == pytest.approx(SIGLIP_PARAMS_M[model], rel=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("config, model, selects", [
    # Only JEST at B/16: its step contains SigLIP's update on the selected batch, so
    # paper/siglip.py compiles the same sharded program (experiments/compile_paper.py runs
    # it, docs/benchmarks.md); each compile costs minutes on 2 cores. L/16 likewise: its
    # parameter count is checked above without a compile.
    ("configs/paper/jest.py:model=B,reference=unused", "B", True),
])
def test_compiles_for_256_devices(config, model, selects):
    r = _compile(config)
    assert r["devices"] == 256 and r["mesh"] == {"data": 16, "fsdp": 16}
    assert r["params_m"] == pytest.approx(SIGLIP_PARAMS_M[model], rel=0.01)
    assert r["candidates"] == (163840 if selects else 32768)  # N = b / (1 - 0.8)
    # Per device the state is its 1/16 FSDP share of params + two Adam moments (float32),
    # plus its 1/256 of the uint8 images and int32 tokens (and cached reference rows).
    state = 3 * 4 * r["params_m"] * 1e6 / 16
    rows = r["candidates"] / 256
    paper = load_config("paper/siglip.py", f"model={model}")
    width, text_len = paper.model.embed_dim, paper.data.text_len
    batch = rows * (256 * 256 * 3 + text_len * 4 + (2 * 4 * width if selects else 0))
    assert r["train_step"]["arguments_gib"] * GiB == pytest.approx(state + batch, rel=0.02)
    assert r["train_step"]["outputs_gib"] * GiB == pytest.approx(state, rel=0.02)
    assert r["train_step"]["tflop_per_device"] > 0
    if selects:  # the scoring kernel compiles on its own too, and costs more than a forward
        assert r["scoring"]["tflop_per_device"] > 0
        assert r["train_step"]["tflop_per_device"] > r["scoring"]["tflop_per_device"]
