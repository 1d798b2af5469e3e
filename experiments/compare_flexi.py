"""Uniform vs JEST vs Flexi-JEST on the embedded data, against steps and against total
FLOPs (reference training and its cache pass included, amortised).

    python experiments/compare_flexi.py [--workdir runs/flexi] [--out docs/results]
        [--steps 500] [--ref-steps 1000] [--seeds 0,1] [--runlocal]

1. trains a reference SigLIP on the clean curated pool of `jest_shapes` and caches its
   embeddings of the raw pool (as `make demo` does; a finished one is reused);
2. trains four learners on the raw pool with equal steps and batch: uniform (plain
   SigLIP), JEST (joint learnability, cached reference), Flexi-JEST with low-resolution
   scoring only (the learner scores at twice the patch size), and Flexi-JEST
   (`configs/shapes.py` flexi=True: scoring, and half of each batch, at twice the patch);
3. writes `<out>/compare_flexi.md` (steps-to-target and FLOPs-to-target per seed, and
   Flexi-JEST's zero-shot at the low resolution) and `<out>/compare_flexi_{steps,flops}.png`.

Total FLOPs of a selection learner = its own logged `flops` (XLA, scoring included) +
(the reference's training FLOPs + the cache pass's) / K, where K is the number of
selection learner runs of this experiment that share the one reference and cache; the
report also gives the ratio with the whole overhead charged to each run (K = 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_methods import (  # noqa: E402
    ATTRIBUTES,
    SHAPES,
    curves,
    plot_accuracy,
    steps_to_reach,
)

from jest_jax import config as config_lib  # noqa: E402
from jest_jax import train  # noqa: E402
from jest_jax.metrics import read_metrics  # noqa: E402
from jest_jax.reference import ReferenceCache  # noqa: E402

LEARNERS = ("uniform", "JEST", "Flexi (low-res scoring only)", "Flexi-JEST")


def learner_config(name: str, base: str, seed: int, eval_every: int):
    method = "uniform" if name == "uniform" else "joint"
    c = config_lib.load(f"{SHAPES}:stage=learner,method={method},{base}"
                        f",flexi={name == 'Flexi-JEST'}")
    if name == "Flexi (low-res scoring only)":
        c.selection.score_patch_size = 2 * c.model.patch_size
    c.seed = seed
    c.evals.every_steps = min(eval_every, c.total_steps)
    c.checkpoint.every_steps = c.total_steps
    c.logging.tensorboard = False
    return c


def run_dir(workdir: str, name: str, seed: int) -> str:
    return os.path.join(workdir, f"{name.split(' ')[0]}"
                                 f"{'_scoring' if 'scoring' in name else ''}_seed{seed}")


def low_res_final(workdir: str) -> float:
    """The final mean zero-shot accuracy at the low resolution (`evals.zero_shot_low_res`,
    which `flexi=True` adds), or NaN for a run without it."""
    rows = [r for r in read_metrics(workdir) if "zero_shot_low_res/shape" in r]
    if not rows:
        return float("nan")
    return float(np.mean([rows[-1][f"zero_shot_low_res/{a}"] for a in ATTRIBUTES]))


def last_flops(workdir: str) -> dict[str, float]:
    rows = [r for r in read_metrics(workdir) if "flops" in r]
    return {k: v for k, v in rows[-1].items() if k.startswith("flops") or k == "step"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/flexi")
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--ref-steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--runlocal", action="store_true", help="tiny data, a few steps")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: report the seeds whose four runs have finished")
    args = parser.parse_args()
    start = time.time()
    ref_dir = os.path.join(args.workdir, "reference")
    cache_dir = os.path.join(ref_dir, "cache_raw")
    base = (f"reference={ref_dir},cache={cache_dir},steps={args.steps},"
            f"runlocal={args.runlocal}")

    config = config_lib.load(f"{SHAPES}:stage=reference,steps={args.ref_steps},"
                             f"runlocal={args.runlocal}")
    config.evals.every_steps = 0
    if not args.report_only:
        print(f"=== reference: SigLIP on the curated pool, {config.total_steps} steps -> "
              f"{ref_dir}")
        train.train(config, ref_dir)
        print(f"\n=== caching the reference's embeddings of the raw pool -> {cache_dir}")
        try:
            spec = config_lib.validate(learner_config("JEST", base, 0, args.eval_every))
            ReferenceCache(spec.reference, spec.data)
            print("up to date; reused")
        except ValueError:
            train.cache_reference(learner_config("JEST", base, 0, args.eval_every))
    with open(os.path.join(cache_dir, "meta.json")) as f:
        cache_flops = json.load(f)["flops"]
    overhead = {"reference": last_flops(ref_dir)["flops"], "cache": cache_flops}

    seeds = [int(s) for s in args.seeds.split(",")]
    if args.report_only:
        seeds = [s for s in seeds if all(os.path.exists(os.path.join(
            run_dir(args.workdir, n, s), "final_metrics.json")) for n in LEARNERS)]
        if not seeds:
            raise SystemExit(f"no seed of {args.seeds} has all four runs finished in "
                             f"{args.workdir}")
    results: dict[str, list[dict]] = {}
    for seed in seeds:  # seed-major: an interrupted experiment has whole seeds
        for name in LEARNERS:
            workdir = run_dir(args.workdir, name, seed)
            if not args.report_only:
                config = learner_config(name, base, seed, args.eval_every)
                print(f"\n=== {name}, seed {seed}, {config.total_steps} steps -> {workdir}")
                train.train(config, workdir)
            c = curves(workdir)
            c["split"] = last_flops(workdir)
            c["low_res_final"] = low_res_final(workdir)
            results.setdefault(name, []).append(c)
    sharing = sum(len(results[n]) for n in LEARNERS if n != "uniform")
    os.makedirs(args.out, exist_ok=True)
    args.seeds = ",".join(map(str, seeds))
    text = report(results, overhead, sharing, args, seeds, time.time() - start)
    with open(os.path.join(args.out, "compare_flexi.md"), "w") as f:
        f.write(text)
    plot(results, overhead, sharing, args.out)
    print("\n" + text)


def total(c: dict, name: str, overhead: dict[str, float], sharing: int) -> np.ndarray:
    """Total FLOPs at each eval: the run's own, plus its share of the reference's."""
    extra = 0.0 if name == "uniform" else sum(overhead.values()) / sharing
    return c["flops"] + extra


def report(results, overhead, sharing, args, seeds, seconds) -> str:
    per_step = {n: results[n][0]["split"]["flops"] / results[n][0]["split"]["step"]
                for n in results}
    charged = sum(overhead.values())
    lines = [
        "# Uniform vs JEST vs Flexi-JEST on jest_shapes\n",
        f"Command: `python experiments/compare_flexi.py --steps {args.steps} --ref-steps "
        f"{args.ref_steps} --seeds {args.seeds}" + (" --runlocal" if args.runlocal else "")
        + f"`; {jax.device_count()} {jax.devices()[0].platform} device(s); "
        + ("report written by `--report-only` from the finished runs.\n" if args.report_only
           else f"wall time {seconds / 60:.1f} min (finished runs are reused).\n"),
        "Every learner: batch 64, raw pool, zero-shot accuracy (mean of the four "
        f"attributes) on the clean eval split every {args.eval_every} steps. Selection "
        "learners draw N = 320 candidates per step and read the reference's cached "
        "embeddings. Flexi: the learner scores at patch 8 (the model's is 4, images "
        "32 px); Flexi-JEST also trains the first half of each batch (λ = 0.5) at patch 8.\n",
        f"**Compute.** Each run's FLOPs are XLA's count of its compiled step (scoring "
        f"included) × steps. The reference's training ({overhead['reference'] / 1e12:.2f} "
        f"TFLOP, {args.ref_steps} steps) and its cache pass over the raw pool "
        f"({overhead['cache'] / 1e12:.2f} TFLOP) are shared by the {sharing} selection "
        f"learner runs here, so each is charged 1/{sharing} of them "
        f"({charged / sharing / 1e12:.2f} TFLOP). The ratios are given three ways: the "
        f"learner's own FLOPs only, with that 1/{sharing} share, and with the whole "
        "overhead charged to the one run. *Break-even K*: how many learners must share "
        "the reference and cache for the method to reach the target with fewer total "
        "FLOPs than uniform.\n",
        "| method | per-step GFLOP (update + scoring) | per step / uniform | ZS mean final "
        "(best), mean of seeds |",
        "|---|---:|---:|---:|",
    ]
    for name, runs in results.items():
        split = runs[0]["split"]
        upd, sco = (split["flops/update"] / split["step"],
                    split["flops/scoring"] / split["step"])
        final = np.mean([c["mean"][-1] for c in runs])
        best = np.mean([c["mean"].max() for c in runs])
        lines.append(f"| {name} | {per_step[name] / 1e9:.2f} ({upd / 1e9:.2f} + "
                     f"{sco / 1e9:.2f}) | {per_step[name] / per_step['uniform']:.2f} | "
                     f"{final:.3f} ({best:.3f}) |")
    lines += ["", "Reaching uniform's final mean zero-shot accuracy (the target), per seed:",
              "", "| method | seed | target | steps to it | own TFLOP to it | uniform ÷ method: "
              f"own FLOPs | amortised over {sharing} | whole overhead | break-even K |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, runs in results.items():
        for seed, c, u in zip(seeds, runs, results["uniform"], strict=True):
            target = u["mean"][-1]
            fu = steps_to_reach(u, target, "flops")
            own = steps_to_reach(c, target, "flops")
            cells = [f"{target:.3f}", f"{steps_to_reach(c, target):.0f}", f"{own / 1e12:.2f}"]
            if name == "uniform":
                cells += ["1.00", "—", "—", "—"]
            else:
                extra = [0.0, charged / sharing, charged]
                cells += [f"{fu / (own + e):.2f}" for e in extra]
                cells.append(f"{charged / (fu - own):.1f}" if fu > own else "never")
            lines.append(f"| {name} | {seed} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("A ratio > 1 means fewer FLOPs than uniform; 0 (steps inf) means the target "
                 "was not reached within the run.")
    flexi = results.get("Flexi-JEST", [])
    if flexi and not np.isnan(flexi[0]["low_res_final"]):
        pairs = ", ".join(f"{c['low_res_final']:.3f} at patch 8 vs {c['mean'][-1]:.3f} at "
                          f"patch 4 (seed {s})" for s, c in zip(seeds, flexi, strict=True))
        lines.append(f"\nFlexi-JEST evaluated with its image tower at the low resolution "
                     f"(`evals.zero_shot_low_res`), final mean zero-shot: {pairs}.")
    lines += ["", "![accuracy vs steps](compare_flexi_steps.png)",
              "![accuracy vs total FLOPs](compare_flexi_flops.png)"]
    return "\n".join(lines) + "\n"


def plot(results, overhead, sharing, out: str) -> None:
    plot_accuracy(results, lambda name, runs: runs[0]["step"], "learner steps",
                  os.path.join(out, "compare_flexi_steps.png"))
    plot_accuracy(results, lambda name, runs: total(runs[0], name, overhead, sharing),
                  "total FLOPs (XLA; reference + cache amortised)",
                  os.path.join(out, "compare_flexi_flops.png"))

if __name__ == "__main__":
    main()
