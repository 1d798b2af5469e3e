"""Input throughput: the webdataset converter, and decoding + preprocessing per host.

    python experiments/bench_input.py [--work runs/bench_input] [--tars 8] [--per_tar 250]
        [--batch 64] [--batches 30] [--step_time 0.5] [--hosts 64]

1. Writes `--tars` img2dataset-style tars of 224x224 JPEGs (smooth random scenes with
   sensor-like noise, ~20 KB each) with captions and a json, once.
2. Converts them with `python -m jest_jax.data.convert` under the DirectRunner with 1 and
   2 worker processes: examples/s over the command's wall time (Beam's start-up included).
3. Reads the converted pool through the training pipeline (`data.pipeline.train_dataset`:
   read, JPEG decode, checks, tokenize, batch) at image_size 224, in this process (grain
   threads only) and with grain worker processes (`data.num_workers`: 1, 2, all cores).
4. Sets that against what a JEST step needs per host at the paper's sizes: b = 32,768
   trained examples from a super-batch of N = b / (1 - 0.8) = 163,840 per step, split over
   `--hosts` hosts, at an assumed `--step_time` seconds per step (not measured here).

Prints markdown tables (docs/benchmarks.md, "Input throughput").
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time

import numpy as np
from PIL import Image

from jest_jax.data import load_split
from jest_jax.data.pipeline import Preprocess, train_dataset
from jest_jax.data.tokenizer import ByteTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_B, PAPER_FILTER = 32_768, 0.8


def scene(rng: np.random.Generator, size: int = 224) -> bytes:
    """A JPEG of a smooth random scene plus noise: closer to a photo than pure noise."""
    low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC), np.float32)
    image += rng.normal(0, 6, image.shape)
    out = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def write_tars(directory: str, tars: int, per_tar: int) -> None:
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    for t in range(tars):
        path = os.path.join(directory, f"{t:06d}.tar")
        if os.path.exists(path):
            continue
        with tarfile.open(path + ".tmp", "w") as tar:
            for i in range(per_tar):
                key = f"{t:05d}{i:04d}"
                meta = {"uid": f"{t * per_tar + i:032x}", "width": 224, "height": 224,
                        "similarity": float(rng.random())}
                for ext, data in (("jpg", scene(rng)), ("txt", f"a photo number {i}".encode()),
                                  ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        os.replace(path + ".tmp", path)


def convert(shards: str, data_dir: str, name: str, tars: int, workers: int) -> tuple:
    """Examples/s of one converter run over its wall time, and per second of work in the
    workers (the summary line's figure: Beam's start-up excluded)."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "jest_jax.data.convert", "webdataset",
         "--input", os.path.join(shards, f"{{000000..{tars - 1:06d}}}.tar"),
         "--data_dir", data_dir, "--name", name, "--split", "train",
         "--num_workers", str(workers)], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        sys.exit(result.stderr[-3000:])
    source, _ = load_split(name, "train", data_dir)
    work = float(re.search(r"\(([0-9.]+) s of work", result.stdout).group(1))
    return len(source) / seconds, len(source) / work


def pipeline_rate(source, batch: int, batches: int, workers: int) -> float:
    """Examples/s through the training pipeline; `workers` 0: in this process."""
    it = iter(train_dataset(source, Preprocess(224, ByteTokenizer(), 64), batch_size=batch,
                            seed=0, num_threads=2, num_workers=workers))
    for _ in range(3):  # workers start, buffers fill
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * batch / (time.perf_counter() - start)
    it.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=os.path.join(ROOT, "runs", "bench_input"))
    parser.add_argument("--tars", type=int, default=8)
    parser.add_argument("--per_tar", type=int, default=250)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--step_time", type=float, default=0.5,
                        help="assumed seconds per JEST step at the paper's sizes")
    parser.add_argument("--hosts", type=int, default=64, help="hosts sharing the batch")
    args = parser.parse_args()

    shards = os.path.join(args.work, "shards")
    write_tars(shards, args.tars, args.per_tar)
    size = np.mean([os.path.getsize(os.path.join(shards, f)) for f in os.listdir(shards)])
    print(f"{args.tars} tars x {args.per_tar} JPEGs of 224x224 "
          f"({size / args.per_tar / 1024:.1f} KB per record); {os.cpu_count()} cores\n")

    data_dir = os.path.join(args.work, f"tfds_{time.time_ns()}")  # fresh: outputs are refused
    print("| converter | examples/s (wall) | vs 1 worker | examples/s per worker-second |\n"
          "|---|---:|---:|---:|")
    rates = {}
    for workers in (1, 2):
        rates[workers], per_work = convert(shards, data_dir, f"w{workers}", args.tars, workers)
        print(f"| DirectRunner, {workers} worker process(es) | {rates[workers]:.0f} | "
              f"{rates[workers] / rates[1]:.2f} | {per_work:.0f} |")

    source, _ = load_split("w1", "train", data_dir)
    cores = os.cpu_count() or 1
    needed = PAPER_B / (1 - PAPER_FILTER) / args.step_time / args.hosts
    print(f"\nJEST at the paper's sizes: N = {PAPER_B / (1 - PAPER_FILTER):,.0f} examples per "
          f"step over {args.hosts} hosts at an assumed {args.step_time} s/step: "
          f"{needed:,.0f} examples/s per host.\n")
    print("| input pipeline (224 px JPEG) | examples/s | needed / measured |\n|---|---:|---:|")
    for workers in sorted({0, 1, 2, cores}):
        rate = pipeline_rate(source, args.batch, args.batches, workers)
        label = "in process (2 grain threads)" if workers == 0 else (
            f"{workers} grain worker process(es)" + (" (all cores)" if workers == cores else ""))
        print(f"| {label} | {rate:.0f} | {needed / rate:.1f}x |")


if __name__ == "__main__":
    main()
