"""Paired differences between two variants of a finished study, seed by seed.

A study's report compares every variant with its baseline. Two other variants (JEST with
one reference against JEST with another) are compared here, from the study's JSON alone:

    python experiments/paired.py docs/results/reference/reference.json \\
        joint_f0.8 joint_f0.8_refraw --key zero_shot/learned --key selection/clean_selected

For each key: A − B per seed (a key logged at every evaluation is taken at the last one),
and their mean ± the half-width of the 95% Student-t interval, as in the report.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import mean_ci  # noqa: E402


def differences(study: dict[str, Any], a: str, b: str, key: str) -> list[float]:
    """A − B of `key` for each seed of `study` (the JSON compare.py writes)."""
    runs = study["runs"]
    out = []
    for seed in study["seeds"]:
        values = []
        for variant in (a, b):
            run = runs.get(f"{variant}_seed{seed}")
            if run is None:
                raise SystemExit(f"error: no run {variant}_seed{seed} in the study; variants: "
                                 f"{sorted(study['variants'])}")
            if key not in run:
                raise SystemExit(f"error: {variant}_seed{seed} has no {key!r}; it has "
                                 f"{sorted(run)}")
            value = run[key]
            values.append(value[-1] if isinstance(value, list) else value)
        out.append(float(values[0] - values[1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", help="a study's JSON (docs/results/<study>/<study>.json)")
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--key", action="append", default=[],
                        help="a per-run key of the JSON (repeat); default: the study's target")
    args = parser.parse_args()
    with open(args.study) as f:
        study = json.load(f)
    for key in args.key or [study["target"]]:
        diffs = differences(study, args.a, args.b, key)
        mean, half = mean_ci(diffs)
        print(f"{key}: {args.a} − {args.b} per seed {[round(d, 4) for d in diffs]}; "
              f"{mean:.3f} ± {half:.3f} (95%, {len(diffs)} seeds)")


if __name__ == "__main__":
    main()
