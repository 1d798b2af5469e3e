"""The reference cache at pod scale: written by two real processes in parallel, killed
midway and resumed from its committed shards, equal to a one-process cache; float32 or
bfloat16; an incomplete or old-format cache is refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from jest_jax import build, cache_store, train
from jest_jax import config as config_lib
from jest_jax.config import ConfigError
from jest_jax.reference import ReferenceCache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD_ROWS = 96  # the tiny raw pool's 512 rows: 6 shards (the last of 32), 3 per process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(script: list[str], reference: str, cache: str, data_dir: str) -> list:
    """Two processes of `--mode cache` (one CPU device each, gloo)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JEST_DATA_DIR": data_dir,
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    # evals.batch_size 64 over 2 processes: 32 rows per device, as in one process at 32.
    args = [*script, "--config", "configs/smoke.py", "--mode", "cache",
            "--config.data.train.split=raw", "--config.selection.method=joint",
            "--config.selection.filter_ratio=0.5", "--config.evals.batch_size=64",
            f"--config.selection.reference.workdir={reference}",
            f"--config.selection.reference.cache_dir={cache}",
            f"--config.selection.reference.cache_shard_rows={SHARD_ROWS}",
            f"--coordinator_address=localhost:{_free_port()}", "--num_processes=2"]
    return [subprocess.Popen([sys.executable, *args, f"--process_id={i}"], env=env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)]


def _rows(cache: str) -> np.ndarray:
    return cache_store.CacheStore(cache).read_rows(np.arange(512))


def _array_bytes(cache: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f))
               for d, _, files in os.walk(os.path.join(cache, "embeddings", "c")) for f in files)


@pytest.mark.slow
def test_two_processes_killed_and_resumed_equal_one(jest_config, reference_workdir, data_dir,
                                                     tmp_path):
    two = str(tmp_path / "two")
    # Process 1 (shards 1, 3, 5) is killed once it has committed shards 1 and 3.
    procs = _start([os.path.join("tests", "kill_in_cache.py"), "1:2"], reference_workdir,
                   two, data_dir)
    out1, _ = procs[1].communicate(timeout=600)
    assert procs[1].returncode == -9, out1[-3000:]
    procs[0].kill()  # the rest of a preempted slice goes down with it
    procs[0].communicate(timeout=600)
    store = cache_store.CacheStore(two)
    committed = set(store.committed())
    assert {1, 3} <= committed and 5 not in committed, committed
    assert store.read_json("meta.json") is None

    # Training refuses the incomplete cache, naming the missing shards and the command.
    jest_config.selection.reference.cache_dir = two
    jest_config.selection.reference.cache_shard_rows = SHARD_ROWS
    missing = sorted(set(range(6)) - committed)
    with pytest.raises(ConfigError, match=rf"is an incomplete cache: shards .*5 "
                       rf"\({len(missing)} of 6\) are not written; finish it by running "
                       r"`python -m jest_jax.main --mode cache` with the same config"):
        build.build(jest_config)

    # The resume redoes only the uncommitted shards, and completes the cache.
    procs = _start(["-m", "jest_jax.main"], reference_workdir, two, data_dir)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert f"{len(committed)} committed before, {len(missing)} to write" in outs[0], outs[0]
    written = {m["process"] for m in store.committed().values()}
    assert written == {0, 1} and set(store.committed()) == set(range(6))
    meta = store.read_json("meta.json")
    assert meta["num_examples"] == 512 and meta["num_shards"] == 6 and meta["flops"] > 0

    # One process (float32, then bfloat16) writes the same rows: bitwise, and rounded.
    one, bf16 = str(tmp_path / "one"), str(tmp_path / "bf16")
    jest_config.selection.reference.cache_dir = one
    train.cache_reference(jest_config)
    jest_config.selection.reference.cache_dtype = "bfloat16"
    jest_config.selection.reference.cache_dir = bf16
    train.cache_reference(jest_config)
    rows = _rows(one)
    np.testing.assert_array_equal(_rows(two), rows)
    np.testing.assert_array_equal(_rows(bf16), rows.astype(ml_dtypes.bfloat16).astype(np.float32))
    np.testing.assert_allclose(np.linalg.norm(rows, axis=-1), 1, atol=1e-5)  # unit embeddings
    width = meta["width"]
    # The size formula of docs/selection.md against the bytes on disk: the embeddings, and
    # a full index (16 B per row of the shard grid) and a checksum (4 B) per shard.
    assert _array_bytes(one) == 512 * 2 * width * 4 + 6 * (96 * 16 + 4)
    assert _array_bytes(bf16) == 512 * 2 * width * 2 + 6 * (96 * 16 + 4)
    assert cache_store.cache_bytes(512, width, "bfloat16", 96) == _array_bytes(bf16)
    # The training side reads rows as the cache holds them.
    spec = config_lib.validate(jest_config)
    cache = ReferenceCache(spec.reference, spec.data)
    got = cache(np.array([37, 5, 511]))
    np.testing.assert_array_equal(got["ref_image"], _rows(bf16)[[37, 5, 511], 0])
    np.testing.assert_array_equal(got["ref_text"], _rows(bf16)[[37, 5, 511], 1])


def test_cache_fields_and_old_format_are_checked(jest_config, tmp_path):
    jest_config.selection.reference.cache_dtype = "float16"
    with pytest.raises(ConfigError, match=r"cache_dtype='float16' is invalid: must be one of "
                       r"\['float32', 'bfloat16'\]"):
        config_lib.validate(jest_config)
    jest_config.selection.reference.cache_dtype = "float32"
    jest_config.selection.reference.cache_shard_rows = 0
    with pytest.raises(ConfigError, match="cache_shard_rows=0 is invalid"):
        config_lib.validate(jest_config)
    jest_config.selection.reference.cache_shard_rows = 64
    old = tmp_path / "old"  # a cache of jest_jax's first format: .npy files and meta.json
    old.mkdir()
    (old / "meta.json").write_text(json.dumps({"format": 1, "num_examples": 512}))
    jest_config.selection.reference.cache_dir = str(old)
    spec = config_lib.validate(jest_config)
    with pytest.raises(ConfigError, match="cache format 1 is not 2 .*re-create it with "
                       "--mode cache"):
        ReferenceCache(spec.reference, spec.data)
