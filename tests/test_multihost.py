"""Two real processes (4 CPU devices each, gloo collectives) train JEST; a checkpoint
resumes on another number of processes and devices (elastic resume) and the run ends
where one uninterrupted process with 4 devices ends; an error one process alone meets
ends both."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import load_config
from jest_jax import train
from jest_jax.checkpoint import CheckpointError
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
        out, _ = p.communicate(timeout=600)
        assert p.returncode == returncode, f"process {i} exited {p.returncode}:\n{out[-4000:]}"
        outputs.append(out)
    return outputs


def _config(data_dir: str, reference: str):
    """The config `_args` gives the command line, for a run in this process."""
    config = load_config("smoke.py", "steps=6")
    for pool in (config.data.train, config.evals.zero_shot.data, config.evals.retrieval.data):
        pool.data_dir = data_dir
    config.data.train.split = "raw"
    config.batch_size = config.evals.batch_size = 32
    config.selection.update(method="joint", filter_ratio=0.5, num_chunks=4)
    config.selection.reference.workdir = reference
    config.checkpoint.every_steps, config.logging.every_steps = 3, 1
    config.logging.tensorboard = False
    return config


def _files(workdir: str) -> dict[str, int]:
    """Every file under `workdir`, with its size."""
    return {os.path.relpath(os.path.join(d, n), workdir): os.path.getsize(os.path.join(d, n))
            for d, _, names in os.walk(workdir) for n in names}


def test_checkpoints_resume_on_other_process_and_device_counts(data_dir, reference_workdir,
                                                               tmp_path):
    """2 processes -> 1 (and 8 devices -> 4), 1 process -> 2 (and 4 devices -> 8), each
    continuing to the losses of one uninterrupted run; a damaged last checkpoint makes
    both processes fall back together; another batch size is refused before anything is
    trained."""
    one, two, grown = (str(tmp_path / name) for name in ("one", "two", "grown"))
    # Uninterrupted, 1 process with 4 devices: the programs the 2 -> 1 resume below runs,
    # so that one reads them from the session's compilation cache.
    _launch(_args(data_dir, reference_workdir, one), 1, 4, [])
    # 2 processes x 4 devices stop at step 3, and 1 process with 4 devices finishes.
    _launch(_args(data_dir, reference_workdir, two), 2, 4, ["--stop_at_step=3"])
    position = os.path.join(two, "checkpoints", "3", "position")
    # One position, written once (orbax's JSON file), no longer one file per process.
    assert not os.path.exists(os.path.join(two, "checkpoints", "3", "data"))
    with open(os.path.join(position, "metadata")) as f:
        assert json.load(f)["stream_position"] == 3 * 64  # 3 super-batches of N = 64
    (out,) = _launch(_args(data_dir, reference_workdir, two), 1, 4, [])
    assert "resuming from the checkpoint at step 3 " in out
    # 1 -> 2 (4 -> 8 devices): the uninterrupted run's checkpoints, resumed by 2 processes
    # x 4 devices. Its step-6 position is damaged, so both fall back to step 3 together
    # and redo 4-6.
    shutil.copytree(one, grown)
    os.remove(os.path.join(grown, "final_metrics.json"))
    with open(os.path.join(grown, "checkpoints", "6", "position", "metadata"), "r+") as f:
        f.truncate(10)
    out = _launch(_args(data_dir, reference_workdir, grown), 2, 4, [])
    assert "the checkpoint at step 6 cannot be restored" in out[0], out[0][-3000:]
    assert "resuming from the checkpoint at step 3 " in out[0] + out[1]
    assert any(n.startswith("6.corrupt-") for n in os.listdir(os.path.join(grown, "checkpoints")))

    rows = {w: [r for r in read_metrics(w) if "loss" in r] for w in (one, two, grown)}
    for w in (two, grown):
        # Only process 0 logs: one row per step, none duplicated by process 1.
        assert [r["step"] for r in rows[w]] == [1, 2, 3, 4, 5, 6]
        # Same global batches and selections; only the reduction order differs (seen: at
        # most 3e-6 relative for the loss and gradient norm, 7e-6 for the selection scores,
        # sums of differences of pair losses); the selected examples are exactly the same.
        for key, rtol in (("loss", 1e-5), ("grad_norm", 1e-5), ("selection/score_selected", 3e-5),
                          ("selection/score_random", 3e-5)):
            np.testing.assert_allclose([r[key] for r in rows[w]], [r[key] for r in rows[one]],
                                       rtol=rtol, err_msg=f"{w}: {key}")
        for key in ("selection/clean_selected", "selection/clean_super"):  # same examples
            assert [r[key] for r in rows[w]] == [r[key] for r in rows[one]], (w, key)
        with open(os.path.join(w, "final_metrics.json")) as f:
            final = json.load(f)
        with open(os.path.join(one, "final_metrics.json")) as f:
            for key, value in json.load(f).items():
                assert final[key] == pytest.approx(value, abs=1e-6), (w, key)

    # Another global batch size would give the same position other examples: refused
    # before anything is trained or written, naming the difference.
    config = _config(data_dir, reference_workdir)
    config.batch_size = 16
    before = _files(two)
    with pytest.raises(CheckpointError, match=re.escape(
            f"the checkpoint at step 6 in {two}/checkpoints cannot continue this run's data "
            "order: it was written with batch_size=32 (this run has 16); a super-batch N=64 "
            "(this run has 32). Resume with the values")):
        train.train(config, two)
    # Nothing changed but the run's own log, which records the refused start and why.
    after = _files(two)
    assert after.pop("log.txt") > before.pop("log.txt") and after == before
    with open(os.path.join(two, "log.txt")) as f:
        assert "cannot continue this run's data order" in f.read()


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
