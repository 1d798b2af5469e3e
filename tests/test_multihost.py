"""Two real processes (4 CPU devices each, gloo collectives) train JEST, stop at a
checkpoint, resume, and end where one process with 8 devices ends; an error one process
alone meets ends both."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from jest_jax.metrics import read_metrics

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _args(data_dir: str, reference: str, workdir: str) -> list[str]:
    overrides = {
        "data.train.data_dir": data_dir, "evals.zero_shot.data.data_dir": data_dir,
        "evals.retrieval.data.data_dir": data_dir, "data.train.split": "raw",
        "batch_size": 32, "evals.batch_size": 32, "selection.method": "joint",
        "selection.filter_ratio": 0.5, "selection.num_chunks": 4,
        "selection.reference.workdir": reference, "checkpoint.every_steps": 3,
        "logging.every_steps": 1, "logging.tensorboard": False,
    }
    return ["-m", "jest_jax.main", "--config", "configs/smoke.py:steps=6", "--workdir", workdir,
            *(f"--config.{k}={v}" for k, v in overrides.items())]


def _launch(args: list[str], processes: int, devices: int, extra: list[str],
            returncode: int = 0) -> list[str]:
    """Run `processes` copies of `args`; each must exit with `returncode`; their outputs."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    flags = []
    if processes > 1:
        flags = [f"--coordinator_address=localhost:{_free_port()}",
                 f"--num_processes={processes}"]
    procs = [subprocess.Popen(
        [sys.executable, *args, *extra, *flags,
         *([f"--process_id={i}"] if processes > 1 else [])],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(processes)]
    outputs = []
    for i, p in enumerate(procs):
        out, _ = p.communicate(timeout=1800)
        assert p.returncode == returncode, f"process {i} exited {p.returncode}:\n{out[-4000:]}"
        outputs.append(out)
    return outputs


def test_two_processes_stop_resume_and_match_one(data_dir, reference_workdir, tmp_path):
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    _launch(_args(data_dir, reference_workdir, two), 2, 4, ["--stop_at_step=3"])
    assert [r["step"] for r in read_metrics(two) if "loss" in r] == [1, 2, 3]
    # Each process saved its own input-pipeline position next to the shared state.
    saved = os.listdir(os.path.join(two, "checkpoints", "3", "data"))
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(saved)
    _launch(_args(data_dir, reference_workdir, two), 2, 4, [])  # resumes at step 3
    # Damage only process 1's part of the last checkpoint: process 0 alone could restore it,
    # but both must resume from the same step, so both fall back to step 3 (and redo 4-6).
    os.remove(os.path.join(two, "checkpoints", "6", "data", "process_1-of-2.json"))
    out = _launch(_args(data_dir, reference_workdir, two), 2, 4, [])
    assert "the checkpoint at step 6 cannot be restored" in out[0], out[0][-3000:]
    assert "resuming from the checkpoint at step 3 " in out[0] + out[1]
    assert any(n.startswith("6.corrupt-") for n in os.listdir(os.path.join(two, "checkpoints")))
    # One process cannot take over the two processes' input positions: a clear error, and
    # the checkpoints stay where they are.
    steps = sorted(os.listdir(os.path.join(two, "checkpoints")))
    (out,) = _launch(_args(data_dir, reference_workdir, two), 1, 8, [], returncode=1)
    assert ("error: the checkpoint at step 6 in " in out and "was written by 2 processes and "
            "this run has 1" in out and "resume with 2 processes (--num_processes)" in out), out
    assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == steps
    _launch(_args(data_dir, reference_workdir, one), 1, 8, [])

    rows = {name: [r for r in read_metrics(w) if "loss" in r] for name, w in
            (("one", one), ("two", two))}
    # Only process 0 logs: one row per step, none duplicated by process 1.
    assert [r["step"] for r in rows["two"]] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "grad_norm", "selection/score_selected", "selection/score_random"):
        # Same global batches and selections; only cross-process reduction order differs.
        np.testing.assert_allclose([r[key] for r in rows["two"]], [r[key] for r in rows["one"]],
                                   rtol=1e-5, err_msg=key)
    for key in ("selection/clean_selected", "selection/clean_super"):  # same examples chosen
        assert [r[key] for r in rows["two"]] == [r[key] for r in rows["one"]], key
    final = {name: json.load(open(os.path.join(w, "final_metrics.json")))
             for name, w in (("one", one), ("two", two))}
    assert final["two"]["step"] == final["one"]["step"] == 6
    for key, value in final["one"].items():
        assert final["two"][key] == pytest.approx(value, abs=1e-6), key


def _pool_with_one_bad_record(root: str, bad: int) -> str:
    """A TFDS pool `one_bad` (split `train`) of 64 records; record `bad` has an empty
    caption. Returns its data_dir."""
    import io

    import tensorflow_datasets as tfds
    from PIL import Image

    from jest_jax.data.datasets import prepare_quietly
    from jest_jax.data.writer import _ImageTextBuilder

    def record(i: int) -> dict:
        image = np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        png = io.BytesIO()
        Image.fromarray(image).save(png, "PNG")
        return {"image": png.getvalue(), "caption": "" if i == bad else f"picture {i}"}

    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
        "caption": tfds.features.Text()})
    builder = _ImageTextBuilder(name="one_bad", version="1.0.0", features=features,
                                splits={"train": iter([(i, record(i)) for i in range(64)])},
                                data_dir=root, file_format="array_record")
    prepare_quietly(builder)
    return str(builder.data_dir)


def test_an_error_one_process_meets_ends_both_with_its_message(data_dir, tmp_path):
    """Under faults.bad_records="error", process 1 alone reads the bad record (global
    position 28 of batch 16: step 2, process 1's half). Process 0 is then waiting for it in
    step 2's collectives; both must end with status 1, each printing the bad record's
    message. Only the failure watch can print it in process 0: a timeout of the
    coordination service or of gloo would end it with a distributed-runtime error."""
    from jest_jax.data.pipeline import Preprocess, train_dataset
    from jest_jax.data.tokenizer import ByteTokenizer

    # The global stream's record order, read from a clean pool of the same size.
    clean = [{"image": np.zeros((16, 16, 3), np.uint8), "caption": "ok"}] * 64
    it = iter(train_dataset(clean, Preprocess(16, ByteTokenizer(), 24), batch_size=16, seed=0,
                            num_threads=0))
    order = np.concatenate([next(it)["index"] for _ in range(2)]).tolist()
    bad = order[28]
    pool = _pool_with_one_bad_record(str(tmp_path / "pool"), bad)
    overrides = {
        "data.train.name": "one_bad", "data.train.split": "train", "data.train.data_dir": pool,
        "evals.zero_shot.data.data_dir": data_dir, "evals.retrieval.data.data_dir": data_dir,
        "batch_size": 16, "evals.batch_size": 16, "seed": 0, "faults.bad_records": "error",
        "logging.tensorboard": False,
    }
    args = ["-m", "jest_jax.main", "--config", "configs/smoke.py:steps=6", "--workdir",
            str(tmp_path / "run"), *(f"--config.{k}={v}" for k, v in overrides.items())]
    outputs = _launch(args, 2, 1, [], returncode=1)
    message = f"error: record {bad} of the training pool is bad: caption is empty"
    assert message in outputs[1], outputs[1][-3000:]
    assert f"process 1 failed: {message}" in outputs[0], outputs[0][-3000:]
