"""Joint selection, dense vs matrix-free, and the scoring step against the training step.

    python experiments/bench_selection.py [--sizes 1024,4096,16384,65536] [--dim 128]
        [--max-dense-gib 8] [--repeats 3]

Part 1: time and peak memory of joint selection from embeddings (learnability, learner
and reference), dense (S materialised) vs matrix-free, with b ≈ N/5 rounded to a multiple
of the 16 chunks. Memory is XLA's buffer assignment of the compiled program (arguments +
outputs + temporaries); dense runs only where that fits under --max-dense-gib.
Part 2: at the demo size (configs/shapes.py learner, b = 64, f = 0.8), the compiled plain
training step, the scoring kernel alone (learner forward on N = 320, cached reference,
joint selection) and the whole JEST step. Prints markdown tables; times are for the
device named.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jest_jax import build, sharding
from jest_jax import config as config_lib
from jest_jax.metrics import compiled_flops
from jest_jax.reference import CachedReference, NoReference
from jest_jax.selection import Embeddings, joint_select, joint_select_from_embeddings, score_matrix

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

GIB = 2.0**30


def timed(compiled: Callable, args: tuple, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up."""
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def peak_bytes(compiled) -> float:
    m = compiled.memory_analysis()
    return float(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                 - m.alias_size_in_bytes)


def embeddings(key: jax.Array, n: int, dim: int) -> Embeddings:
    a, b = jax.random.split(key)
    img = jax.random.normal(a, (n, dim))
    txt = img + jax.random.normal(b, (n, dim))
    norm = lambda x: x / jnp.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    return Embeddings(norm(img), norm(txt), jnp.log(10.0), jnp.asarray(-10.0))


def bench_joint(sizes: list[int], dim: int, max_dense_gib: float, repeats: int) -> None:
    chunks = 16
    print("| N | b | dense s | dense peak GiB | matrix-free s | matrix-free peak GiB | "
          "dense / matrix-free time |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        b = max(chunks, int(round(n / 5 / chunks)) * chunks)
        learner = embeddings(jax.random.key(0), n, dim)
        reference = embeddings(jax.random.key(1), n, dim)
        key = jax.random.key(2)
        dense_fn = jax.jit(lambda k, le, re, b=b: joint_select(
            k, score_matrix(le, re, "learnability"), b, chunks))
        free_fn = jax.jit(lambda k, le, re, b=b: joint_select_from_embeddings(
            k, le, re, "learnability", b, chunks))
        args = (key, learner, reference)
        free = free_fn.lower(*args).compile()
        free_s, free_mem = timed(free, args, repeats), peak_bytes(free)
        dense = dense_fn.lower(*args).compile()
        dense_mem = peak_bytes(dense)
        if dense_mem / GIB <= max_dense_gib:
            dense_s = timed(dense, args, repeats)
            cells = f"{dense_s:.3f} | {dense_mem / GIB:.3f}"
            ratio = f"{dense_s / free_s:.2f}"
        else:
            cells, ratio = f"does not fit | {dense_mem / GIB:.1f} (needed)", "—"
        print(f"| {n} | {b} | {cells} | {free_s:.3f} | {free_mem / GIB:.3f} | {ratio} |",
              flush=True)


def bench_scoring(repeats: int) -> None:
    config = config_lib.load(f"{CONFIGS}/shapes.py:stage=learner,method=joint")
    # Shapes only need no reference run: the cache is synthetic.
    spec = config_lib.validate(config, num_devices=jax.device_count(), check_files=False)
    mesh = spec.mesh.build()
    scalars = {"log_temperature": jnp.log(10.0), "bias": jnp.asarray(-10.0)}
    plain = build.wire(spec, mesh, 258, NoReference(), selection=False)
    jest = build.wire(spec, mesh, 258, CachedReference(scalars))
    n, b = jest.scorer.spec.num_candidates, spec.batch_size
    size, length = spec.data.image_size, spec.data.text_len
    rng = np.random.default_rng(0)
    ref = embeddings(jax.random.key(3), n, spec.model.embed_dim)
    super_batch = sharding.to_global({
        "image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        "tokens": rng.integers(1, 258, (n, length), dtype=np.int32),
        "ref_image": np.asarray(ref.image), "ref_text": np.asarray(ref.text)}, mesh)
    batch = {k: v[:b] for k, v in super_batch.items() if k in ("image", "tokens")}
    state = plain.state.init(0)  # for lowering only

    plain_step = plain.step.lower(state, batch, {}).compile()
    score = jax.jit(jest.scorer).lower(jax.random.key(0), state["params"], scalars,
                                       super_batch).compile()
    jest_step = jest.step.lower(state, super_batch, scalars).compile()
    fresh = lambda: plain.state.init(0)  # noqa: E731  the train steps donate their input state
    rows = []
    for name, compiled, args in (
            (f"plain train step (b={b})", plain_step, lambda: (fresh(), batch, {})),
            (f"scoring kernel (N={n} → b={b})", score, lambda: (
                jax.random.key(0), fresh()["params"], scalars, super_batch)),
            ("JEST train step (scoring + update)", jest_step,
             lambda: (fresh(), super_batch, scalars))):
        args = args()
        if compiled is score:
            seconds = timed(compiled, args, repeats)
        else:  # feed each call the state the last one returned
            s, times = args[0], []
            for _ in range(repeats + 1):
                start = time.perf_counter()
                s, metrics, _ = compiled(s, *args[1:])
                jax.block_until_ready(metrics)
                times.append(time.perf_counter() - start)
            seconds = float(np.median(times[1:]))
        rows.append((name, seconds, compiled_flops(compiled)))
    base_s, base_f = rows[0][1], rows[0][2]
    print("| step | ms | GFLOP (XLA) | time / plain step | FLOPs / plain step |")
    print("|---|---:|---:|---:|---:|")
    for name, seconds, flops in rows:
        print(f"| {name} | {1e3 * seconds:.1f} | {flops / 1e9:.2f} | {seconds / base_s:.2f} | "
              f"{flops / base_f:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1024,4096,16384,65536")
    parser.add_argument("--dim", type=int, default=128, help="embedding width")
    parser.add_argument("--max-dense-gib", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"device: {jax.device_count()}x {jax.devices()[0].device_kind}\n")
    print("Joint selection from embeddings (learnability, 16 chunks, "
          f"embedding width {args.dim}):\n")
    bench_joint([int(s) for s in args.sizes.split(",")], args.dim, args.max_dense_gib,
                args.repeats)
    print("\nScoring vs training at the demo size (configs/shapes.py learner, f = 0.8, "
          "cached reference):\n")
    bench_scoring(args.repeats * 5)


if __name__ == "__main__":
    main()
