"""Train-step throughput and XLA-measured FLOPs at the smoke and demo sizes.

    python experiments/bench_train.py [--steps 20]

Synthetic batches (no input pipeline), so this times the compiled step alone. Prints a
markdown table; absolute times are for the device it names.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from jest_jax import build, sharding
from jest_jax import config as config_lib
from jest_jax.metrics import compiled_flops
from jest_jax.reference import NoReference

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def bench(config, steps: int) -> dict[str, float]:
    spec = config_lib.validate(config, num_devices=jax.device_count(), check_files=False)
    mesh = spec.mesh.build()
    wired = build.wire(spec, mesh, vocab_size=258, reference=NoReference())
    rng = np.random.default_rng(0)
    b, size, length = spec.batch_size, spec.data.image_size, spec.data.text_len
    batch = sharding.to_global({
        "image": rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8),
        "tokens": rng.integers(1, 258, (b, length), dtype=np.int32)}, mesh)
    state = wired.state.init(0)
    compiled = wired.step.lower(state, batch, {}).compile()
    flops = compiled_flops(compiled)
    for _ in range(3):  # warm-up
        state, metrics, _ = compiled(state, batch, {})
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics, _ = compiled(state, batch, {})
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / steps
    return {"batch": b, "ms_per_step": 1e3 * seconds, "gflops_per_step": flops / 1e9,
            "gflops_per_sec": flops / seconds / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    device = f"{jax.device_count()}x {jax.devices()[0].device_kind}"
    print(f"device: {device}\n")
    print("| config | batch | ms/step | GFLOP/step (XLA) | achieved GFLOP/s |")
    print("|---|---:|---:|---:|---:|")
    for name, config in (("smoke", config_lib.load(f"{CONFIGS}/smoke.py")),
                         ("shapes (demo)", config_lib.load(f"{CONFIGS}/shapes.py:stage=learner"))):
        r = bench(config, args.steps)
        print(f"| {name} | {r['batch']} | {r['ms_per_step']:.1f} | {r['gflops_per_step']:.2f} "
              f"| {r['gflops_per_sec']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
