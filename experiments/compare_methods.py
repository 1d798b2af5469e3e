"""The method comparison behind `make demo`: one reference, then five learners on the raw pool.

    python experiments/compare_methods.py [--workdir runs/demo] [--out docs/results]
        [--steps 500] [--ref-steps 1000] [--seeds 0] [--runlocal]

1. trains a reference SigLIP on the clean curated pool of `jest_shapes`;
2. caches its embeddings of the noisy raw pool (`--mode cache`);
3. trains learners on the raw pool with equal steps and batch size: uniform (plain
   SigLIP), easy_reference / hard_learner / learnability with independent selection,
   and JEST (learnability, joint selection);
4. writes `<out>/compare_methods.md` (table, the step-ratio JEST vs uniform) and
   `<out>/compare_steps.png`, `<out>/compare_flops.png` (zero-shot accuracy curves).

Every run lives in `<workdir>/<name>[_seedS]`; re-running resumes or reuses finished runs.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import jax
import numpy as np

from jest_jax import config as config_lib
from jest_jax import train
from jest_jax.metrics import read_metrics
from jest_jax.reference import ReferenceCache

SHAPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "shapes.py")

# name -> (method, criterion); all learners use filter ratio 0.8 except uniform.
LEARNERS = {
    "uniform": ("uniform", "learnability"),
    "easy_reference": ("independent", "easy_reference"),
    "hard_learner": ("independent", "hard_learner"),
    "learnability": ("independent", "learnability"),
    "JEST": ("joint", "learnability"),
}
ATTRIBUTES = ("shape", "color", "size", "position")


def zs_mean(row: dict) -> float:
    """Mean zero-shot accuracy over the four attributes: the headline number."""
    return float(np.mean([row[f"zero_shot/{a}"] for a in ATTRIBUTES]))


def curves(workdir: str) -> dict[str, np.ndarray]:
    """Eval rows of a run as arrays: step, flops (at that step), per-attribute and mean."""
    rows = read_metrics(workdir)
    flops = {r["step"]: r["flops"] for r in rows if "flops" in r}
    evals = [r for r in rows if "zero_shot/shape" in r]
    per_step = max(flops.items())[1] / max(flops) if flops else float("nan")
    out = {"step": np.array([r["step"] for r in evals]),
           "mean": np.array([zs_mean(r) for r in evals])}
    out["flops"] = out["step"] * per_step
    for a in ATTRIBUTES:
        out[a] = np.array([r[f"zero_shot/{a}"] for r in evals])
    for key in ("retrieval/i2t_r1", "retrieval/t2i_r1"):
        out[key] = np.array([r.get(key, np.nan) for r in evals])
    train_rows = [r for r in rows if "loss" in r]
    out["clean_selected"] = np.array([r["selection/clean_selected"] for r in train_rows
                                      if "selection/clean_selected" in r])
    out["clean_super"] = np.array([r["selection/clean_super"] for r in train_rows
                                   if "selection/clean_super" in r])
    speeds = [r["steps_per_sec"] for r in train_rows if "steps_per_sec" in r]
    out["steps_per_sec"] = np.array([np.median(speeds) if speeds else np.nan])
    out["total_flops"] = np.array([max(flops.values()) if flops else np.nan])
    return out


def steps_to_reach(c: dict[str, np.ndarray], target: float, x: str = "step") -> float:
    """`x` (step or flops) at the first eval whose mean zero-shot accuracy is >= target
    (inf if never)."""
    hit = np.nonzero(c["mean"] >= target - 1e-9)[0]
    return float(c[x][hit[0]]) if hit.size else float("inf")


def _avg(runs: list[dict[str, np.ndarray]], key: str, reduce) -> float:
    """`reduce(run[key])` averaged over seeds."""
    return float(np.mean([reduce(c[key]) for c in runs]))


def table(results: dict[str, list[dict[str, np.ndarray]]]) -> str:
    """Markdown table, averaged over seeds: final (best) per attribute and more."""
    head = (["method"] + [f"ZS {a} final (best)" for a in ATTRIBUTES]
            + ["ZS mean final (best)", "I→T R@1", "T→I R@1", "clean selected",
               "steps/s", "TFLOP total", "steps to uniform's final (per seed)"])
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    # Each seed is compared with uniform's run of the same seed.
    uniform_final = [c["mean"][-1] for c in results["uniform"]]
    for name, runs in results.items():
        final = {k: _avg(runs, k, lambda a: a[-1]) for k in (*ATTRIBUTES, "mean",
                                                              "retrieval/i2t_r1",
                                                              "retrieval/t2i_r1")}
        cells = [f"{final[k]:.3f} ({_avg(runs, k, np.max):.3f})" for k in (*ATTRIBUTES, "mean")]
        cells += [f"{final['retrieval/i2t_r1']:.3f}", f"{final['retrieval/t2i_r1']:.3f}",
                  f"{_avg(runs, 'clean_selected', np.mean):.3f}",
                  f"{_avg(runs, 'steps_per_sec', np.mean):.2f}",
                  f"{_avg(runs, 'total_flops', np.mean) / 1e12:.1f}",
                  " / ".join(f"{steps_to_reach(c, target):.0f}"
                             for c, target in zip(runs, uniform_final, strict=False))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_accuracy(results: dict[str, list[dict[str, np.ndarray]]],
                  xs: Callable[[str, list[dict[str, np.ndarray]]], np.ndarray],
                  label: str, path: str) -> str:
    """One figure: mean zero-shot accuracy over seeds (and per attribute) against
    `xs(name, runs)`, saved to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(20, 3.8))
    for ax, key in zip(axes, ("mean", *ATTRIBUTES), strict=True):
        for name, runs in results.items():
            ax.plot(xs(name, runs), np.mean([r[key] for r in runs], axis=0), marker=".",
                    label=name)
        ax.set_title(f"zero-shot {key}" + (" (4 attributes)" if key == "mean" else ""))
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot(results: dict[str, list[dict[str, np.ndarray]]], out: str) -> list[str]:
    """Mean zero-shot accuracy (and per attribute) against steps and against FLOPs."""
    return [plot_accuracy(results, lambda name, runs, x=x: runs[0][x], label,
                          os.path.join(out, f"compare_{'steps' if x == 'step' else 'flops'}.png"))
            for x, label in (("step", "learner steps"), ("flops", "cumulative FLOPs (XLA)"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--steps", type=int, default=500, help="steps of every learner")
    parser.add_argument("--ref-steps", type=int, default=1000, help="steps of the reference")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--filter", type=float, default=0.8, help="filtering ratio f")
    parser.add_argument("--seeds", default="0", help="comma-separated learner seeds")
    parser.add_argument("--only", default="", help="comma-separated subset of learners")
    parser.add_argument("--runlocal", action="store_true", help="tiny data, a few steps")
    args = parser.parse_args()
    start = time.time()
    base = f"steps={args.steps},runlocal={args.runlocal}"
    ref_dir = os.path.join(args.workdir, "reference")
    cache_dir = os.path.join(ref_dir, "cache_raw")

    config = config_lib.load(f"{SHAPES}:stage=reference,steps={args.ref_steps},"
                             f"runlocal={args.runlocal}")
    config.evals.every_steps = 0
    print(f"=== reference: SigLIP on the curated pool, {config.total_steps} steps "
          f"({jax.device_count()} {jax.devices()[0].platform} device(s)) -> {ref_dir}")
    train.train(config, ref_dir)

    def learner_config(method: str, criterion: str, seed: int):
        c = config_lib.load(f"{SHAPES}:stage=learner,method={method},criterion={criterion},"
                            f"filter={args.filter},reference={ref_dir},cache={cache_dir},{base}")
        c.seed = seed
        c.evals.every_steps = min(args.eval_every, c.total_steps)
        c.checkpoint.every_steps = c.total_steps
        c.logging.tensorboard = False
        return c

    print(f"\n=== caching the reference's embeddings of the raw pool -> {cache_dir}")
    try:  # reuse a cache that matches the reference's latest checkpoint
        spec = config_lib.validate(learner_config("joint", "learnability", 0))
        ReferenceCache(spec.reference, spec.data)
        print("up to date; reused")
    except ValueError:
        train.cache_reference(learner_config("joint", "learnability", 0))

    names = [n for n in LEARNERS if not args.only or n in args.only.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, list[dict[str, np.ndarray]]] = {}
    for name in names:
        for seed in seeds:
            method, criterion = LEARNERS[name]
            config = learner_config(method, criterion, seed)
            workdir = os.path.join(args.workdir, f"{name}_seed{seed}")
            print(f"\n=== learner {name} ({method}, {criterion}), seed {seed}, "
                  f"{config.total_steps} steps -> {workdir}")
            train.train(config, workdir)
            results.setdefault(name, []).append(curves(workdir))

    os.makedirs(args.out, exist_ok=True)
    text = report(results, args, seeds, time.time() - start)
    if "uniform" in results:
        with open(os.path.join(args.out, "compare_methods.md"), "w") as f:
            f.write(text)
        plot(results, args.out)
    print("\n" + text)


def report(results, args, seeds, seconds: float) -> str:
    lines = [
        "# Method comparison on jest_shapes\n",
        f"Command: `python experiments/compare_methods.py --steps {args.steps} "
        f"--ref-steps {args.ref_steps} "
        f"--filter {args.filter} --seeds {args.seeds}`" + (" --runlocal" if args.runlocal else "")
        + f"; {jax.device_count()} {jax.devices()[0].platform} device(s); wall time "
        f"{seconds / 60:.1f} min (runs already finished are reused).\n",
        f"Every learner: batch 64, {args.steps} steps, raw pool (44.8% clean, plus 15% "
        "near-duplicates of clean pairs, which count as not clean); selection methods "
        f"draw N = 64 / (1 - {args.filter}) candidates per step. Reference: the same model "
        f"trained on the curated pool for {args.ref_steps} steps, its embeddings cached. "
        f"Zero-shot accuracy on the clean eval split, every {args.eval_every} steps; "
        f"seeds {seeds} (averaged).\n",
        table(results), "",
    ]
    if "uniform" in results and "JEST" in results:
        for seed, u, j in zip(seeds, results["uniform"], results["JEST"], strict=False):
            target = u["mean"][-1]
            su, sj = steps_to_reach(u, target), steps_to_reach(j, target)
            fu, fj = steps_to_reach(u, target, "flops"), steps_to_reach(j, target, "flops")
            lines.append(f"- seed {seed}: uniform's final mean zero-shot accuracy "
                         f"{target:.3f}; uniform reaches it at step {su:.0f}, JEST at "
                         f"step {sj:.0f}: "
                         f"{su / sj:.2f}x fewer learner steps; in FLOPs (XLA, scoring "
                         f"included) {fu / 1e12:.2f} vs {fj / 1e12:.2f} TFLOP: {fu / fj:.2f}x.")
        for name, runs in results.items():
            if runs[0]["clean_super"].size:
                lines.append(f"- {name}: clean fraction {_avg(runs, 'clean_super', np.mean):.3f} "
                             f"in the super-batch, {_avg(runs, 'clean_selected', np.mean):.3f} "
                             "selected.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
