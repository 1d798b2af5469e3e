"""The demo behind `make demo`: a reference SigLIP on the clean curated pool and a learner
on the noisy raw pool (uniform sampling), both evaluated on the clean eval split.

    python experiments/demo.py --workdir runs/demo [--steps 1000] [--runlocal]

Writes `<workdir>/results.md` (the table printed at the end) next to both runs' workdirs.
"""

from __future__ import annotations

import argparse
import os
import time

import jax

from configs import shapes
from jest_jax import train
from jest_jax.metrics import read_metrics

COLUMNS = [("zero_shot/shape", "ZS shape"), ("zero_shot/color", "ZS colour"),
           ("zero_shot/size", "ZS size"), ("zero_shot/position", "ZS position"),
           ("retrieval/i2t_r1", "I→T R@1"), ("retrieval/t2i_r1", "T→I R@1"),
           ("retrieval/i2t_r5", "I→T R@5")]


def chance_row(config) -> dict[str, float]:
    """Chance accuracy per attribute (1 / classes) and chance recall (k / N)."""
    from jest_jax.data import load_split

    source, info = load_split(**config.evals.zero_shot.data)
    n = len(source) if config.evals.max_examples == -1 else config.evals.max_examples
    row = {f"zero_shot/{k}": 1 / info.features[k].num_classes
           for k in config.evals.zero_shot.label_keys}
    row.update({f"retrieval/{d}_r{k}": k / n for d in ("i2t", "t2i") for k in (1, 5, 10)})
    return row


def table(rows: dict[str, dict[str, float]]) -> str:
    lines = ["| run | " + " | ".join(h for _, h in COLUMNS) + " | steps/s |",
             "|---|" + "---:|" * (len(COLUMNS) + 1)]
    for name, r in rows.items():
        cells = [f"{r[k]:.3f}" if k in r else "" for k, _ in COLUMNS]
        speed = f"{r['steps_per_sec']:.2f}" if "steps_per_sec" in r else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {speed} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--runlocal", action="store_true", help="tiny data, a few steps")
    args = parser.parse_args()
    start = time.time()
    rows = {}
    for stage, pool in (("reference", "curated"), ("learner", "raw")):
        config = shapes.get_config(f"stage={stage},steps={args.steps},runlocal={args.runlocal}")
        workdir = os.path.join(args.workdir, stage)
        print(f"\n=== {stage}: SigLIP on the {pool} pool, {config.total_steps} steps "
              f"({jax.device_count()} {jax.devices()[0].platform} device(s)) -> {workdir}")
        results = train.train(config, workdir)
        speeds = [m["steps_per_sec"] for m in read_metrics(workdir) if "steps_per_sec" in m]
        rows[f"{stage} ({pool})"] = {**results, "steps_per_sec": speeds[-1] if speeds else 0.0}
    rows["chance"] = chance_row(config)
    text = (f"# Demo results\n\nEval split: {config.evals.zero_shot.data.name}:"
            f"{config.evals.zero_shot.data.split}; {config.total_steps} steps, batch "
            f"{config.batch_size}; wall time {time.time() - start:.0f} s.\n\n{table(rows)}\n")
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "results.md"), "w") as f:
        f.write(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
