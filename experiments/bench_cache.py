"""Reference-cache throughput and size: `--mode cache` with 1 and 2 processes.

    python experiments/bench_cache.py [--work runs/bench_cache] [--pool jest_shapes]
        [--split raw] [--shard_rows 4096]

1. Trains a tiny reference (configs/smoke.py, 10 steps) once, if `--work` has none.
2. Caches `--pool`'s `--split` with it by the command line, in float32 with 1 process,
   then with 2 processes (gloo, one CPU device each), then in bfloat16 with 1 process:
   examples/s per process, from each process's own `[cache]` progress line (its rows over
   the time since its first batch), and the whole command's wall time.
3. Sizes: the array's bytes on disk against `cache_store.cache_bytes`, and what the
   formula gives per 1M examples at this width and at the paper's width 768.

Prints markdown tables (docs/benchmarks.md, "Reference cache").
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jest_jax import cache_store  # noqa: E402  (after the path: run from a checkout)
from jest_jax.files import read_json  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _cache(args, reference: str, cache: str, processes: int, dtype: str) -> dict:
    """One `--mode cache` command on `processes` processes; its rates and wall time."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONPATH": ROOT}
    flags = ["--config", "configs/smoke.py", "--mode", "cache",
             f"--config.data.train.name={args.pool}", f"--config.data.train.split={args.split}",
             "--config.selection.method=joint", "--config.selection.filter_ratio=0.5",
             f"--config.evals.batch_size={64 * processes}",  # 64 rows per process per call
             f"--config.selection.reference.workdir={reference}",
             f"--config.selection.reference.cache_dir={cache}",
             f"--config.selection.reference.cache_dtype={dtype}",
             f"--config.selection.reference.cache_shard_rows={args.shard_rows}"]
    if processes > 1:
        flags += [f"--coordinator_address=localhost:{_port()}", f"--num_processes={processes}"]
    start = time.perf_counter()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "jest_jax.main", *flags,
         *([f"--process_id={i}"] if processes > 1 else [])], env=env, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(processes)]
    outs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - start
    rates = []
    for p, out in zip(procs, outs, strict=True):
        if p.returncode:
            sys.exit(f"--mode cache failed:\n{out[-3000:]}")
        rates.append(float(re.findall(r"\[cache\] process \d+: .* ([\d.]+) rows/s", out)[-1]))
    layout = read_json(os.path.join(cache, "meta.json"))
    return {"rates": rates, "wall": wall, "rows": layout["num_examples"],
            "width": layout["width"]}


def _disk_bytes(cache: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f))
               for d, _, files in os.walk(os.path.join(cache, "embeddings", "c")) for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/bench_cache")
    parser.add_argument("--pool", default="jest_shapes")
    parser.add_argument("--split", default="raw")
    parser.add_argument("--shard_rows", type=int, default=4096)
    args = parser.parse_args()
    work = os.path.abspath(args.work)
    reference = os.path.join(work, "reference")
    if not os.path.isdir(os.path.join(reference, "checkpoints")):
        subprocess.run([sys.executable, "-m", "jest_jax.main", "--config",
                        "configs/smoke.py:steps=10", "--workdir", reference], cwd=ROOT,
                       check=True, env={**os.environ, "PYTHONPATH": ROOT})
    runs = {}
    for name, processes, dtype in (("1 process", 1, "float32"), ("2 processes", 2, "float32"),
                                   ("1 process, bfloat16", 1, "bfloat16")):
        cache = os.path.join(work, f"cache_{processes}_{dtype}")
        subprocess.run(["rm", "-rf", cache], check=True)  # a fresh cache, not a resume
        runs[name] = (_cache(args, reference, cache, processes, dtype), cache, dtype)

    print(f"\nPool {args.pool} {args.split}; tiny reference (configs/smoke.py); "
          f"{os.cpu_count()} CPU cores\n")
    print("| run | examples/s per process | examples/s, all processes | command wall (s) |")
    print("|---|---|---|---|")
    base = None
    for name, (r, _, _) in runs.items():
        total = sum(r["rates"])
        base = base or total
        print(f"| {name} | {' / '.join(f'{x:.0f}' for x in r['rates'])} | {total:.0f} "
              f"({total / base:.2f}×) | {r['wall']:.1f} |")
    print("\n| dtype | bytes on disk | formula | per 1M examples, this width | per 1M, width 768 |")
    print("|---|---|---|---|---|")
    for r, cache, dtype in (runs["1 process"], runs["1 process, bfloat16"]):
        formula = cache_store.cache_bytes(r["rows"], r["width"], dtype, args.shard_rows)
        per_m = cache_store.cache_bytes(10**6, r["width"], dtype, args.shard_rows)
        per_m768 = cache_store.cache_bytes(10**6, 768, dtype, 65536)
        print(f"| {dtype} | {_disk_bytes(cache):,} | {formula:,} | {per_m / 2**30:.3f} GiB "
              f"| {per_m768 / 2**30:.2f} GiB |")


if __name__ == "__main__":
    main()
