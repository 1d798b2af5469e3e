"""The experiment harness (experiments/compare.py): its statistics against scipy and hand
cases, saved configs, clear errors for bad studies, and a toy study of 2 variants x 2
seeds run end to end as real processes, killed mid-run and resumed."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.stats

from tests.conftest import ROOT, load_config

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import compare  # noqa: E402
import paired  # noqa: E402

from jest_jax import config as config_lib  # noqa: E402

TOY = os.path.join(ROOT, "tests", "toy_study.py")


@pytest.mark.parametrize("values", [[0.31, 0.35], [0.2, 0.25, 0.4], [1.5, 1.1, 0.9, 2.0, 1.3],
                                    list(np.linspace(-3, 7, 12) ** 2)])
def test_mean_ci_is_scipys_student_t_interval(values):
    mean, half = compare.mean_ci(values)
    x = np.asarray(values, np.float64)
    low, high = scipy.stats.t.interval(0.95, x.size - 1, loc=x.mean(),
                                       scale=scipy.stats.sem(x))
    np.testing.assert_allclose([mean - half, mean + half], [low, high], rtol=1e-12)
    _, half90 = compare.mean_ci(values, level=0.9)
    low, high = scipy.stats.t.interval(0.9, x.size - 1, loc=x.mean(), scale=scipy.stats.sem(x))
    np.testing.assert_allclose(half90, (high - low) / 2, rtol=1e-12)


def test_paired_differences_against_scipys_paired_interval(tmp_path):
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.6, 0.1, 4), rng.normal(0.5, 0.1, 4)
    study = {"seeds": [0, 1, 2, 3], "target": "acc", "variants": {"A": {}, "B": {}},
             "runs": {**{f"A_seed{i}": {"acc": [0.1, float(v)], "clean": float(v)}
                         for i, v in enumerate(a)},
                      **{f"B_seed{i}": {"acc": [0.2, float(v)], "clean": float(v)}
                         for i, v in enumerate(b)}}}
    diffs = paired.differences(study, "A", "B", "acc")
    np.testing.assert_allclose(diffs, a - b, rtol=1e-12)
    assert paired.differences(study, "A", "B", "clean") == diffs  # a scalar key
    mean, half = compare.mean_ci(diffs)
    low, high = scipy.stats.ttest_rel(a, b).confidence_interval(0.95)
    assert (mean - half, mean + half) == pytest.approx((low, high), rel=1e-9)
    with pytest.raises(SystemExit, match="no run C_seed0 in the study"):
        paired.differences(study, "A", "C", "acc")
    with pytest.raises(SystemExit, match="A_seed0 has no 'loss'"):
        paired.differences(study, "A", "B", "loss")


def test_mean_ci_of_one_seed_has_no_interval():
    mean, half = compare.mean_ci([0.4])
    assert mean == 0.4 and math.isnan(half)
    assert compare.fmt(mean, half) == "0.400"


@pytest.mark.parametrize("x, y, target, expected", [
    ([50, 100, 150], [0.2, 0.3, 0.5], 0.4, 125.0),    # halfway between 100 and 150
    ([50, 100, 150], [0.2, 0.3, 0.5], 0.3, 100.0),    # exactly at an evaluation
    ([50, 100, 150], [0.2, 0.3, 0.5], 0.35, 112.5),   # a quarter of the way
    ([50, 100, 150], [0.2, 0.3, 0.5], 0.1, 50.0),     # the first evaluation reaches it
    ([50, 100, 150], [0.2, 0.3, 0.5], 0.6, math.inf),  # never
    ([10, 20, 30, 40], [0.1, 0.5, 0.2, 0.6], 0.4, 17.5),  # the first crossing, not a later
    ([10, 20, 30, 40], [0.1, 0.3, 0.2, 0.6], 0.4, 35.0),  # a dip: from the eval before
    ([0, 1e12, 3e12], [0.0, 0.5, 0.6], 0.55, 2e12),   # FLOPs work the same way
])
def test_first_crossing_hand_cases(x, y, target, expected):
    assert compare.first_crossing(x, y, target) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("spec, devices", [
    ("shapes.py:stage=learner,method=joint,flexi=True", 1), ("smoke.py", 1),
    ("paper/jest.py:model=B,reference=unused,flexi=True", 256)])
def test_a_saved_config_validates_to_the_same_spec(tmp_path, spec, devices):
    config = load_config(*spec.split(":", 1)) if ":" in spec else load_config(spec)
    path = tmp_path / "c.json"
    path.write_text(config.to_json_best_effort(indent=2))
    saved = config_lib.load(f"{ROOT}/configs/saved.py:{path}")
    assert (config_lib.validate(saved, devices, check_files=False)
            == config_lib.validate(config, devices, check_files=False))


def _study(tmp_path, **changes) -> str:
    """The toy study with `changes`, as a new study file."""
    fields = compare.load_study(TOY).__dict__ | changes
    del fields["name"]
    path = tmp_path / "study.py"
    path.write_text(f"def get_study(arg=None):\n    return {fields!r}\n")
    return str(path)


def _error(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        compare.main(argv)
    return str(e.value)


def test_bad_studies_are_clear_errors_before_anything_runs(tmp_path):
    work = str(tmp_path / "work")
    bad = _study(tmp_path, variants={"uniform": {"method": "uniform"},
                                     "JEST": {"method": "joint", "filtr": 0.5}})
    message = _error([bad, "--workdir", work])
    assert message.startswith("error: study.variants.JEST: unknown field(s) ['filtr']; a "
                              "variant sets method (")
    assert "filter (selection.filter_ratio" in message
    assert "study.seeds is empty" in _error([_study(tmp_path, seeds=()), "--workdir", work])
    assert "study.seeds is empty" in _error([TOY, "--seeds", " ", "--workdir", work])
    message = _error([TOY, "--target", "accuracy/top1", "--workdir", work])
    assert message.startswith("error: study.target/report 'accuracy/top1': the learners run "
                              "no eval task 'accuracy' (their tasks: ['retrieval', "
                              "'zero_shot'])")
    assert "study.baseline='plain' is not a variant" in _error(
        [_study(tmp_path, baseline="plain"), "--workdir", work])
    assert "config.selection.num_chunkz does not exist" in _error(
        [_study(tmp_path, set={"selection.num_chunkz": 4}), "--workdir", work])
    message = _error([_study(tmp_path, variants={"uniform": {"method": "uniform"},
                                                 "J": {"method": "joint", "filter": 1.5}}),
                      "--workdir", work])
    assert message.startswith("error: study.variants.J: config.selection.filter_ratio=1.5")
    assert "--only: no variant(s) ['JST']" in _error([TOY, "--only", "JST", "--workdir", work])
    assert not os.path.exists(work)  # nothing was written


def test_a_pod_study_prints_its_commands(tmp_path, capsys):
    """--dry-run on the paper's configs (256 devices): nothing trains; every run's config is
    written and its command printed, after the runs it needs."""
    study = _study(tmp_path, base="configs/paper/jest.py:model=B,reference=unused",
                   set={}, references={"curated": {
                       "config": "configs/paper/siglip.py:model=B,data=curated_pairs"}},
                   variants={"SigLIP": {"method": "uniform"},
                             "JEST": {"method": "joint", "reference": "curated"}},
                   baseline="SigLIP", target="retrieval/i2t_r1", report=())
    compare.main([study, "--dry-run", "--workdir", str(tmp_path / "pod")])
    out = capsys.readouterr().out.splitlines()
    commands = [line for line in out if line.startswith("python -m jest_jax.main")]
    assert len(commands) == 1 + 1 + 2 * 2  # reference, its cache pass, 2 variants x 2 seeds
    assert commands[0].endswith("/pod/ref_curated")
    cache = next(i for i, c in enumerate(commands) if "--mode cache" in c)
    assert commands[cache].endswith("/ref_curated/cache_config.json --mode cache   # after "
                                    "ref_curated")
    jest = [i for i, c in enumerate(commands) if "/JEST_seed" in c]
    assert len(jest) == 2 and min(jest) > cache
    assert all(commands[i].endswith("   # after cache_curated") for i in jest)
    assert sum(c.endswith("/SigLIP_seed0") or c.endswith("/SigLIP_seed1") for c in commands) == 2
    saved = config_lib.load(f"{ROOT}/configs/saved.py:{tmp_path}/pod/JEST_seed1/study_config.json")
    assert saved.seed == 1 and saved.selection.method == "joint"
    assert saved.selection.reference.cache_dir == f"{tmp_path}/pod/ref_curated/cache"
    assert not os.path.exists(tmp_path / "pod" / "JEST_seed1" / "checkpoints")


def _wait_for(path: str, proc: subprocess.Popen, what: str) -> None:
    """Until `path` exists; a hang guard only (no timing is asserted)."""
    deadline = time.time() + 900
    while not os.path.exists(path):
        assert proc.poll() is None, f"the harness ended before {what}"
        assert time.time() < deadline, f"no {what} after 900 s"
        time.sleep(0.05)


def _curve(workdir: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    evals = [r for r in rows if "zero_shot/color" in r]
    if key == "zero_shot/mean":
        values = [np.mean([r[f"zero_shot/{a}"] for a in ("shape", "color", "size", "position")])
                  for r in evals]
    else:
        values = [r[key] for r in evals]
    return np.array([r["step"] for r in evals], np.float64), np.array(values, np.float64)


@pytest.mark.slow
def test_a_toy_study_runs_end_to_end_and_resumes_after_a_kill(tmp_path, data_dir):
    """2 variants x 2 seeds, plus a reference and its cache pass, as real processes. The
    harness is killed (SIGKILL) while the first learner trains; its run checkpoints on the
    SIGTERM the harness's death sends it, and the second harness resumes it. The report's
    numbers are recomputed here from the metrics files, with NumPy and scipy."""
    work, out = str(tmp_path / "work"), str(tmp_path / "out")
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "compare.py"), TOY,
           "--workdir", work, "--out", out]
    for field in ("data.train.data_dir", "evals.zero_shot.data.data_dir",
                  "evals.retrieval.data.data_dir"):
        cmd += ["--set", f"{field}={data_dir}"]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(os.path.join(work, "uniform_seed0", "checkpoints", "10"), first,
              "checkpoint at step 10")
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not os.path.exists(os.path.join(work, "uniform_seed0", "final_metrics.json"))

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "= ref_clean: finished earlier, reused" in done.stdout
    # The harness's death sent the run SIGTERM: it checkpointed where it was and stopped.
    log = open(os.path.join(work, "uniform_seed0", "log.txt")).read()
    assert "SIGTERM received: checkpointing after this step and exiting" in log
    resumed = [int(m) for m in re.findall(r"resuming from the checkpoint at step (\d+)", log)]
    assert len(resumed) == 1 and 10 < resumed[0] < 40
    rows = [json.loads(line) for line in
            open(os.path.join(work, "uniform_seed0", "metrics.jsonl"))]
    for kind in ("loss", "zero_shot/color"):  # each train and each eval step logged once
        steps = [r["step"] for r in rows if kind in r]
        assert steps == sorted(set(steps)) and steps[-1] == 40

    result = json.load(open(os.path.join(out, "toy_study.json")))
    assert set(result["runs"]) == {"uniform_seed0", "uniform_seed1", "JEST_seed0", "JEST_seed1"}
    for variant in ("uniform", "JEST"):
        finals, ratios = [], []
        for seed in (0, 1):
            x, y = _curve(os.path.join(work, f"{variant}_seed{seed}"), "zero_shot/mean")
            bx, by = _curve(os.path.join(work, f"uniform_seed{seed}"), "zero_shot/mean")
            target = by[-1]
            row = result["variants"][variant]["seeds"][seed]
            assert row["target"] == pytest.approx(target, rel=1e-12)
            assert row["final"] == pytest.approx(y[-1], rel=1e-12)
            # Steps to the target, brute force: the piecewise-linear curve on a fine grid.
            grid = np.linspace(x[0], x[-1], 200_001)
            above = np.nonzero(np.interp(grid, x, y) >= target - 1e-12)[0]
            reach = grid[above[0]] if above.size else math.inf
            base = grid[np.nonzero(np.interp(grid, bx, by) >= target - 1e-12)[0][0]]
            got = row["steps_to_target"]
            assert (got == "inf") if math.isinf(reach) else got == pytest.approx(reach, abs=1e-3)
            # Worth: the baseline's steps to this run's final value ÷ this run's steps.
            above = np.nonzero(np.interp(grid, bx, by) >= y[-1] - 1e-12)[0]
            worth = row["worth_ratio"]
            if above.size:
                assert worth == pytest.approx(grid[above[0]] / x[-1], abs=1e-4)
            else:
                assert worth == "inf"
            finals.append(y[-1])
            ratios.append(0.0 if math.isinf(reach) else base / reach)
        summary = result["variants"][variant]["summary"]
        low, high = scipy.stats.t.interval(0.95, 1, loc=np.mean(finals),
                                           scale=scipy.stats.sem(finals))
        np.testing.assert_allclose([summary["final"][0] - summary["final"][1],
                                    summary["final"][0] + summary["final"][1]], [low, high],
                                   rtol=1e-9)
        np.testing.assert_allclose(summary["step_ratio"][0], np.mean(ratios), rtol=1e-4)
    # Total FLOPs: the run's own cumulative count at each eval (from its training rows),
    # plus half of the reference's training and cache pass (2 JEST runs share it).
    ref_rows = [json.loads(line) for line in
                open(os.path.join(work, "ref_clean", "metrics.jsonl"))]
    cache_meta = json.load(open(os.path.join(work, "ref_clean", "cache", "meta.json")))
    overhead = [r for r in ref_rows if "flops" in r][-1]["flops"] + cache_meta["flops"]
    assert result["reference_overhead"]["clean"] == pytest.approx(overhead, rel=1e-12)
    for run, share in (("uniform_seed0", 0.0), ("JEST_seed1", overhead / 2)):
        rows = [json.loads(line) for line in open(os.path.join(work, run, "metrics.jsonl"))]
        own = {r["step"]: r["flops"] for r in rows if "flops" in r}
        steps = result["runs"][run]["step"]
        np.testing.assert_allclose(result["runs"][run]["total_flops"],
                                   [own[s] + share for s in steps], rtol=1e-12)
    for name in ("toy_study.md", "toy_study_steps.png", "toy_study_flops.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0

    # A target the runs do not log: a clear error from the finished runs, nothing trained.
    message = _error(cmd[2:] + ["--report-only", "--target", "zero_shot/material"])
    assert message.startswith("error: study.target='zero_shot/material': run uniform_seed0 "
                              "does not log it")
    assert "zero_shot/color" in message
