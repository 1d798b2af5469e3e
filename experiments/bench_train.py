"""Train-step throughput and XLA-measured FLOPs: the smoke and demo sizes, then uniform,
JEST and Flexi-JEST side by side at the demo size; or any configs on this machine's
devices, side by side, with achieved TFLOP/s and MFU.

    python experiments/bench_train.py [--steps 20]
    # e.g. B/16 in bf16 on one accelerator (experiments/gpu_checks.sh):
    python experiments/bench_train.py --vocab 32000 --peak-tflops 989 --set batch_size=1024 \
        --config configs/paper/siglip.py:model=B,fsdp=1 \
        --config configs/paper/jest.py:model=B,fsdp=1,reference=unused,flexi=True

Synthetic batches (no input pipeline), so this times the compiled step alone; selection
reads a synthetic reference cache. Prints markdown tables; absolute times are for the
device it names.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accounting import a4_prediction  # noqa: E402

from jest_jax import build, sharding  # noqa: E402
from jest_jax import config as config_lib  # noqa: E402
from jest_jax.reference import CachedReference, NoReference  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
VOCAB = 258  # the byte tokenizer's


def bench(config, steps: int, vocab: int = VOCAB, a4: bool = False) -> dict[str, float]:
    """Median step time and XLA FLOPs (whole, update, scoring) of `config`'s train step,
    on synthetic (super-)batches; selection reads a synthetic reference cache. With `a4`,
    also the §A.4 prediction (which compiles forward passes of its own)."""
    spec = config_lib.validate(config, num_devices=jax.device_count(), check_files=False)
    mesh = spec.mesh.build()
    scalars = {"log_temperature": jnp.log(10.0), "bias": jnp.asarray(-10.0)}
    reference = CachedReference(scalars) if spec.selection.needs_reference else NoReference()
    wired = build.wire(spec, mesh, vocab_size=vocab, reference=reference)
    rows = wired.scorer.spec.num_candidates if wired.scorer else spec.batch_size
    rng = np.random.default_rng(0)
    size, length = spec.data.image_size, spec.data.text_len
    local = {"image": rng.integers(0, 256, (rows, size, size, 3), dtype=np.uint8),
             "tokens": rng.integers(1, vocab, (rows, length), dtype=np.int32)}
    for name in reference.batch_fields:  # unit reference embeddings, as the cache holds
        x = rng.normal(size=(rows, spec.model.embed_dim)).astype(np.float32)
        local[name] = x / np.linalg.norm(x, axis=1, keepdims=True)
    batch = sharding.to_global(local, mesh)
    ref_input = reference.step_input
    flops = wired.flops(batch, ref_input)
    state = wired.state.init(0)
    times = []
    for i in range(steps + 3):  # 3 warm-up steps (the first compiles)
        start = time.perf_counter()
        state, metrics, _ = wired.step(state, batch, ref_input)
        jax.block_until_ready(metrics)
        if i >= 3:
            times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    return {"batch": spec.batch_size, "candidates": rows, "ms_per_step": 1e3 * seconds,
            **{k: v / mesh.size for k, v in flops.items()},  # per device, as XLA reports
            "gflops_per_sec": flops["flops"] / mesh.size / seconds / 1e9,
            **({"a4": a4_prediction(spec, vocab)} if a4 else {})}


def sizes(steps: int) -> None:
    print("| config | batch | ms/step | GFLOP/step (XLA) | achieved GFLOP/s |")
    print("|---|---:|---:|---:|---:|")
    for name, config in (("smoke", config_lib.load(f"{CONFIGS}/smoke.py")),
                         ("shapes (demo)", config_lib.load(f"{CONFIGS}/shapes.py:stage=learner"))):
        r = bench(config, steps)
        print(f"| {name} | {r['batch']} | {r['ms_per_step']:.1f} | {r['flops'] / 1e9:.2f} "
              f"| {r['gflops_per_sec']:.1f} |", flush=True)


def methods_config(name: str):
    """The demo learner (configs/shapes.py) as each method of the Flexi-JEST comparison."""
    shapes = f"{CONFIGS}/shapes.py:stage=learner"
    if name == "uniform":
        return config_lib.load(f"{shapes},method=uniform")
    if name == "Flexi-JEST":
        return config_lib.load(f"{shapes},method=joint,flexi=True")
    config = config_lib.load(f"{shapes},method=joint")
    if name == "Flexi-JEST, low-res scoring only":
        config.selection.score_patch_size = 2 * config.model.patch_size
    return config


METHODS = ("uniform", "JEST", "Flexi-JEST, low-res scoring only", "Flexi-JEST")


def methods(steps: int) -> None:
    print("| method | N → b | ms/step | GFLOP/step (XLA) | update | scoring | "
          "time / uniform | FLOPs / uniform | §A.4 formula / uniform (r_s, r_t) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = None
    for name in METHODS:
        r = bench(methods_config(name), steps, a4=True)
        base = base or r
        a4 = r["a4"]
        print(f"| {name} | {r['candidates']} → {r['batch']} | {r['ms_per_step']:.1f} | "
              f"{r['flops'] / 1e9:.2f} | {r['flops/update'] / 1e9:.2f} | "
              f"{r['flops/scoring'] / 1e9:.2f} | {r['ms_per_step'] / base['ms_per_step']:.2f} | "
              f"{r['flops'] / base['flops']:.2f} | {a4['ratio']:.2f} "
              f"({a4['r_score']:.2f}, {a4['r_train']:.2f}) |", flush=True)


def configs(paths: list[str], overrides: dict, steps: int, vocab: int,
            peak_tflops: float) -> None:
    """`paths` side by side: per device, as XLA counts and this device runs them."""
    print("| config | N → b | ms/step | TFLOP/step (XLA) | achieved TFLOP/s | MFU | "
          "time / first | FLOPs / first |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    base = None
    for path in paths:
        config = config_lib.load(path)
        config_lib.set_fields(config, overrides, "--set")
        r = bench(config, steps, vocab)
        base = base or r
        tflops = r["flops"] / 1e12 / (r["ms_per_step"] / 1e3)
        mfu = f"{tflops / peak_tflops:.1%}" if peak_tflops else "—"
        print(f"| {path} | {r['candidates']} → {r['batch']} | {r['ms_per_step']:.1f} | "
              f"{r['flops'] / 1e12:.4g} | {tflops:.4g} | {mfu} | "
              f"{r['ms_per_step'] / base['ms_per_step']:.2f} | "
              f"{r['flops'] / base['flops']:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", choices=("sizes", "methods"), default=None)
    parser.add_argument("--config", action="append", default=[],
                        help="bench this config (file[:args]) instead; repeat to compare")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="with --config: override a field of every config (VALUE is a "
                             "Python literal), e.g. --set batch_size=1024")
    parser.add_argument("--vocab", type=int, default=VOCAB,
                        help="with --config: vocabulary size (the paper's: 32000)")
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="with --config: the device's peak TFLOP/s in the compute dtype, "
                             "for MFU (e.g. 989 for an H100/H200 SXM in dense bf16)")
    args = parser.parse_args()
    print(f"device: {jax.device_count()}x {jax.devices()[0].device_kind}\n")
    if args.config:
        try:
            overrides = dict(map(config_lib.parse_assignment, args.set))
        except config_lib.ConfigError as e:
            parser.error(f"--set: {e}")
        configs(args.config, overrides, args.steps, args.vocab, args.peak_tflops)
        return
    if args.only != "methods":
        sizes(args.steps)
    if args.only != "sizes":
        print("\nUniform, JEST and Flexi-JEST at the demo size (configs/shapes.py learner, "
              "b = 64, f = 0.8, cached reference):\n")
        methods(args.steps)


if __name__ == "__main__":
    main()
