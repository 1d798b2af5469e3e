"""The experiment harness: learner variants x seeds of one base config, each trained (or
resumed) as its own `python -m jest_jax.main` process, compared on one target metric.

    python experiments/compare.py configs/studies/reproduce.py:study=demo [--workdir runs/demo]
        [--out docs/results/demo] [--jobs 1] [--seeds 0,1] [--set FIELD=VALUE ...]
    python experiments/compare.py my_pod_study.py --dry-run \\
        --workdir gs://bucket/study        # prints the commands to run on a TPU pod

A study file (configs/studies/*.py) returns a dict from `get_study(arg)`:

    base        the learner config, "path.py[:args]" (relative to the repository root)
    variants    {name: {field: value}}, fields from VARIANT_FIELDS below, in table order
    seeds       learner seeds; every variant runs every seed
    baseline    the variant whose final target value (per seed) defines "the target"
    target      the metric compared: a logged key ("zero_shot/color") or a mean of keys
                (`metrics` below; "<task>/mean" is the mean of <task>'s top-1 keys)
    references  {name: {config, set, cache}}: reference runs trained first (and their
                embeddings of the learners' pool cached when cache=True)
    ...         see STUDY_DEFAULTS for the rest (eval_every, filter, report, metrics, ...)

Everything lives in `<workdir>/<run>`: re-running resumes unfinished runs (from their
checkpoints) and reuses finished ones; a run dir made with another config is an error,
not overwritten. A killed harness takes its runs down with it (SIGTERM: they checkpoint
first). `<out>` gets `<study>.md` (mean ± 95% CI over seeds; steps and FLOPs to the
target, interpolated between evaluations), `<study>.json` (everything) and plots against
steps and against total FLOPs. docs/results.md explains how to read them.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import fcntl
import functools
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import ml_collections
import numpy as np
from scipy import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from jest_jax import config as config_lib  # noqa: E402
from jest_jax import files  # noqa: E402
from jest_jax.metrics import read_metrics  # noqa: E402

SAVED = "configs/saved.py"  # runs start in the repository root

# What a variant may set, and what it sets in the learner's config.
VARIANT_FIELDS = {
    "method": "selection.method: uniform | independent | joint (or a registered one)",
    "criterion": "selection.criterion: a registered name or module:function",
    "criterion_args": "selection.criterion_args: the criterion's keyword arguments (dict)",
    "filter": "selection.filter_ratio f (default: the study's `filter`, 0 for uniform)",
    "flexi": "False | True (Flexi-JEST: score and train λ = 0.5 at twice the patch) | "
             "'scoring' (score at twice the patch only)",
    "reference": "a name in the study's `references`, or a reference run's workdir",
    "steps": "total_steps (default: the base config's)",
    "set": "{dotted.field: value}: any other config fields",
}
REFERENCE_FIELDS = {"config": "the reference's config, path.py[:args]",
                    "set": "{dotted.field: value} on it",
                    "cache": "cache its embeddings of the learners' pool (default True)"}
STUDY_DEFAULTS = dict(
    name="",            # the report's file names (default: the study file's name)
    title="",           # the report's heading
    description="",     # a paragraph for the report: what the study asks
    base="",
    set={},             # {dotted.field: value} on every learner
    references={},
    variants={},
    seeds=(),
    baseline="",
    target="",
    metrics={},         # {name: (logged keys...)}: derived metrics, the mean of the keys
    report=(),          # metrics whose final values get a table (default: the target)
    eval_every=50,      # learner eval interval in steps (steps-to-target interpolates)
    filter=0.8,         # the filtering ratio of selection variants that set none
    amortise_over=0,    # share of a reference's cost per run: 1/K (0: its runs here)
    command="",         # how the committed results were made (shown in the report)
)
LEVEL = 0.95


class StudyError(ValueError):
    """A study that cannot run as written; the message names the field."""


# ----------------------------------------------------------------------------- statistics


def mean_ci(values: Any, level: float = LEVEL) -> tuple[float, float]:
    """Mean and the half-width of its two-sided Student-t confidence interval
    (sample standard deviation, n - 1 degrees of freedom); NaN half-width for n < 2."""
    x = np.asarray(values, np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    if x.size < 2:
        return float(x[0]), float("nan")
    q = stats.t.ppf(0.5 + level / 2, x.size - 1)
    return float(x.mean()), float(q * x.std(ddof=1) / math.sqrt(x.size))


def first_crossing(x: Any, y: Any, target: float) -> float:
    """The first `x` at which `y` reaches `target`, linearly interpolated between the
    evaluation before (below the target) and the first at or above it; the first `x` if
    the first evaluation already reaches it; inf if no evaluation does."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    hit = np.nonzero(y >= target)[0]
    if not hit.size:
        return math.inf
    k = int(hit[0])
    if k == 0:
        return float(x[0])
    t = (target - y[k - 1]) / (y[k] - y[k - 1])
    return float(x[k - 1] + t * (x[k] - x[k - 1]))


def fmt(mean: float, half: float, digits: int = 3, inf: str = "never") -> str:
    """"m ± h", or "m" alone when there is no interval (one seed)."""
    if math.isinf(mean):
        return inf
    if math.isnan(half):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


# ----------------------------------------------------------------------------- the study


@dataclasses.dataclass
class Study:
    """A study file's `get_study(arg)` dict, checked; the fields are STUDY_DEFAULTS'."""

    name: str
    title: str
    description: str
    base: str
    set: dict[str, Any]
    references: dict[str, dict[str, Any]]
    variants: dict[str, dict[str, Any]]
    seeds: tuple[int, ...]
    baseline: str
    target: str
    metrics: dict[str, tuple[str, ...]]
    report: tuple[str, ...]
    eval_every: int
    filter: float
    amortise_over: int
    command: str


def load_study(path: str, arg: str = "") -> Study:
    """The study file's `get_study(arg)` (a dict: dotted field names, and the variants in
    the order written), checked and filled with STUDY_DEFAULTS."""
    if not os.path.isfile(path):
        raise StudyError(f"no study file {path!r}")
    import importlib.util

    module_spec = importlib.util.spec_from_file_location(f"_study_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_study"):
        raise StudyError(f"{path} has no get_study(arg) function")
    try:
        raw = module.get_study(arg or None)
    except ValueError as e:
        raise StudyError(str(e)) from None
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: get_study must return a dict, not {type(raw).__name__}")
    unknown = sorted(set(raw) - set(STUDY_DEFAULTS))
    if unknown:
        raise StudyError(f"{path}: unknown study field(s) {unknown}; known: "
                         f"{sorted(STUDY_DEFAULTS)}")
    fields = {**STUDY_DEFAULTS, **raw}
    fields["name"] = fields["name"] or os.path.splitext(os.path.basename(path))[0]
    fields["seeds"] = tuple(int(x) for x in fields["seeds"])
    fields["report"] = tuple(fields["report"])
    fields["metrics"] = {k: tuple(v) for k, v in fields["metrics"].items()}
    return Study(**fields)


@dataclasses.dataclass
class Run:
    """One process of the study: a reference's training, its cache pass, or a learner."""

    label: str                      # unique: "<variant>_seed<s>", "ref_<name>", ...
    kind: str                       # "reference" | "cache" | "learner"
    workdir: str
    config: ml_collections.ConfigDict
    after: tuple[str, ...] = ()     # labels that must finish first
    variant: str = ""
    seed: int = 0
    reference: str = ""             # the study reference a learner uses ("" if none)

    @property
    def config_path(self) -> str:
        name = "cache_config.json" if self.kind == "cache" else "study_config.json"
        return files.join(self.workdir, name)

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "jest_jax.main", "--config",
               f"{SAVED}:{self.config_path}"]
        return cmd + (["--mode", "cache"] if self.kind == "cache" else
                      ["--workdir", self.workdir])

    def finished(self) -> bool:
        if self.kind == "cache":
            return files.is_file(files.join(self.config.selection.reference.cache_dir,
                                            "meta.json"))
        # A run stopped early (SIGTERM, --stop_at_step) writes it too, at its last step.
        path = files.join(self.workdir, "final_metrics.json")
        return (files.is_file(path)
                and files.read_json(path).get("step") == self.config.total_steps)


def _set(config: ml_collections.ConfigDict, where: str, fields: dict[str, Any]) -> None:
    try:
        config_lib.set_fields(config, dict(fields), where)
    except config_lib.ConfigError as e:
        raise StudyError(str(e)) from None


def _config(spec: str, where: str) -> ml_collections.ConfigDict:
    path, sep, arg = spec.partition(":")
    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(ROOT, path)
    try:
        return config_lib.load(path + (sep + arg if sep else ""))
    except (FileNotFoundError, ValueError) as e:
        raise StudyError(f"{where}={spec!r}: {e}") from None


def plan(study: Study, workdir: str,
         overrides: tuple[str, ...] = ()) -> list[Run]:
    """Every run of `study` under `workdir`, in dependency order, each config validated
    (without devices or files: a pod config is planned on a laptop)."""
    if not study.base:
        raise StudyError("study.base is empty: name the learner config")
    if not study.variants:
        raise StudyError("study.variants is empty: give at least one learner variant")
    if not study.seeds:
        raise StudyError("study.seeds is empty: give at least one seed (e.g. --seeds 0,1)")
    if study.baseline not in study.variants:
        raise StudyError(f"study.baseline={study.baseline!r} is not a variant; variants: "
                         f"{list(study.variants)}")
    if not study.target:
        raise StudyError("study.target is empty: name the metric to compare")
    extra = dict(_literal(o) for o in overrides)
    runs: list[Run] = []
    cache_of: dict[str, Run] = {}
    used = {v.get("reference", "") for v in study.variants.values()}
    for name, ref in study.references.items():
        if name not in used:  # e.g. after --only
            continue
        unknown = sorted(set(ref) - set(REFERENCE_FIELDS))
        if unknown:
            raise StudyError(f"study.references.{name}: unknown field(s) {unknown}; known: "
                             f"{sorted(REFERENCE_FIELDS)}")
        config = _config(ref.get("config", ""), f"study.references.{name}.config")
        _set(config, f"study.references.{name}.set", ref.get("set", {}))
        _set(config, "--set", extra)
        config.evals.every_steps = 0  # a reference is judged by its learners
        runs.append(Run(f"ref_{name}", "reference", files.join(workdir, f"ref_{name}"),
                        _checked(config, f"study.references.{name}")))
    for name in list(study.variants):
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
            raise StudyError(f"study.variants: name {name!r} must be letters, digits, "
                             "'_', '.', '+' or '-' (it names directories)")
        unknown = sorted(set(study.variants[name]) - set(VARIANT_FIELDS))
        if unknown:
            raise StudyError(
                f"study.variants.{name}: unknown field(s) {unknown}; a variant sets "
                + "; ".join(f"{k} ({v})" for k, v in VARIANT_FIELDS.items()))
    # Seed-major: an interrupted study has whole seeds.
    for seed in study.seeds:
        for name in list(study.variants):
            variant = study.variants[name]
            config = _config(study.base, "study.base")
            _set(config, "study.set", study.set)  # the variant's own fields come after
            ref = _variant(config, study, name, variant)
            _set(config, f"study.variants.{name}.set", variant.get("set", {}))
            _set(config, "--set", extra)
            config.seed = int(seed)
            config.evals.every_steps = min(int(study.eval_every), int(config.total_steps))
            config.logging.tensorboard = False
            after: tuple[str, ...] = ()
            if ref:
                ref_run = next(r for r in runs if r.label == f"ref_{ref}")
                config.selection.reference.workdir = ref_run.workdir
                after = (ref_run.label,)
                if study.references[ref].get("cache", True):
                    config.selection.reference.cache_dir = files.join(ref_run.workdir, "cache")
                    after = (f"cache_{ref}",)
                    if ref not in cache_of:
                        cache_of[ref] = Run(f"cache_{ref}", "cache", ref_run.workdir,
                                            config.copy_and_resolve_references(),
                                            after=(ref_run.label,))
                        runs.append(cache_of[ref])
                    elif (cache_of[ref].config.data.train.to_dict()
                          != config.data.train.to_dict()):
                        raise StudyError(f"study.variants.{name}: its training pool differs "
                                         f"from another variant's, but reference {ref!r} "
                                         "caches one pool; give it its own reference")
            label = f"{name}_seed{seed}"
            runs.append(Run(label, "learner", files.join(workdir, label),
                            _checked(config, f"study.variants.{name}"), after, name,
                            int(seed), ref))
    return runs


def _literal(item: str) -> tuple[str, Any]:
    try:
        return config_lib.parse_assignment(item)
    except config_lib.ConfigError as e:
        raise StudyError(f"--set: {e}") from None


def _variant(config: ml_collections.ConfigDict, study: Study, name: str,
             variant: dict[str, Any]) -> str:
    """Applies a variant's fields to `config`; the study reference it uses ("" if none)."""
    where = f"study.variants.{name}"
    selection = config.selection
    if "method" in variant:
        selection.method = variant["method"]
    if "criterion" in variant:
        selection.criterion = variant["criterion"]
    if "criterion_args" in variant:
        selection.criterion_args = ml_collections.ConfigDict(dict(variant["criterion_args"]))
    default = 0.0 if selection.method == "uniform" else float(study.filter)
    selection.filter_ratio = float(variant.get("filter", default))
    flexi = variant.get("flexi", False)
    if flexi not in (False, True, "scoring"):
        raise StudyError(f"{where}.flexi={flexi!r}; use False, True or 'scoring'")
    if flexi:
        selection.score_patch_size = 2 * config.model.patch_size
    if flexi is True:
        config.model.low_res_patch_size = 2 * config.model.patch_size
        config.model.low_res_fraction = 0.5
    if "steps" in variant:
        config.total_steps = int(variant["steps"])
    ref = variant.get("reference", "")
    if ref and ref not in study.references:
        if not files.exists(ref):
            raise StudyError(f"{where}.reference={ref!r} is neither a study reference "
                             f"({sorted(study.references)}) nor an existing run workdir")
        selection.reference.workdir = ref
        return ""
    return ref


def _checked(config: ml_collections.ConfigDict, where: str) -> ml_collections.ConfigDict:
    try:
        config_lib.validate(config, check_files=False)
    except (config_lib.ConfigError, ValueError) as e:
        raise StudyError(f"{where}: {e}") from None
    return config


def check_target(study: Study, runs: list[Run]) -> None:
    """Before training: the target (and reported metrics) must come from an eval task the
    learners run, or be a derived mean. Keys themselves are checked on the first log."""
    tasks = {k for k, v in runs[-1].config.evals.items()
             if isinstance(v, ml_collections.ConfigDict)}
    for key in (study.target, *study.report):
        if key in study.metrics:
            continue
        task = key.split("/")[0]
        if task not in tasks:
            raise StudyError(f"study.target/report {key!r}: the learners run no eval task "
                             f"{task!r} (their tasks: {sorted(tasks)}); name a metric "
                             "they log, e.g. zero_shot/mean or retrieval/i2t_r1")


# ----------------------------------------------------------------------------- running


try:  # loaded once here: the forked child may only call into it
    _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:  # not Linux: runs then outlive a SIGKILLed harness
    _LIBC = None


def _die_with_parent(parent: int) -> None:
    """In the child: SIGTERM when the harness dies, however it dies, so that a killed
    harness leaves no orphan training; the run checkpoints on SIGTERM (docs/reliability.md).
    A harness that died before this ran is noticed by its pid."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
    """One harness (and its runs) per local workdir at a time. The lock's file description
    is inherited by the runs, so a second harness waits until the runs of a killed one
    have checkpointed and stopped, instead of writing into the same run dirs."""
    if "://" in workdir:
        yield
        return
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(os.path.join(workdir, ".harness.lock"), os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another harness (or the runs of a killed one) in {workdir} "
                  "to stop ...", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.set_inheritable(fd, True)
        yield fd
    finally:
        os.close(fd)


def prepare(run: Run, write: bool = True) -> None:
    """Writes the run's config (checks it only, without `write`); refuses a run dir made
    with another config."""
    text = run.config.to_json_best_effort(indent=2, sort_keys=True)
    if files.is_file(run.config_path):
        # A cache pass runs with the config of the first learner that reads it; another
        # study's first learner differs in its own fields but caches the same rows.
        if run.kind == "cache" and (_cache_inputs(json.loads(files.read_text(run.config_path)))
                                    == _cache_inputs(json.loads(text))):
            return
        if files.read_text(run.config_path) != text:
            raise StudyError(f"{run.workdir} was made with another config than this study "
                             f"now gives {run.label} (see {run.config_path}); delete it or "
                             "use another --workdir")
        return
    if write:
        files.makedirs(run.workdir)
        files.write_atomically(run.config_path, text)


def _cache_inputs(config: dict[str, Any]) -> tuple[Any, ...]:
    """What a cache pass's rows depend on: the pool, its preprocessing, the reference."""
    return config["data"], config["selection"]["reference"], config["evals"]["batch_size"]


def execute(runs: list[Run], workdir: str, jobs: int, lock_fd: int | None,
            on_finish=None) -> None:
    """Runs every unfinished run, up to `jobs` at once, each after the runs it needs;
    stops launching at the first failure and raises naming it and its log."""
    logs = files.join(workdir, "logs")
    files.makedirs(logs)
    todo = [r for r in runs if not r.finished()]
    done = {r.label for r in runs if r not in todo}
    for r in runs:
        if r.label in done:
            print(f"= {r.label}: finished earlier, reused", flush=True)
            if on_finish:
                on_finish(r)
    running: dict[str, tuple[Run, subprocess.Popen, float]] = {}
    failed: list[str] = []
    total = len(todo)

    def echo(run: Run, proc: subprocess.Popen, path: str) -> None:
        """Prints the run's log as it grows (the run writes the file itself, so its output
        survives the harness)."""
        with open(path) as f:
            f.seek(0, os.SEEK_END)
            while True:
                line = f.readline()
                if line:
                    print(f"  [{run.label}] {line}", end="", flush=True)
                elif proc.poll() is not None:
                    return
                else:
                    time.sleep(0.2)

    def forward(signum, frame):  # the runs checkpoint (below), then the harness exits
        raise KeyboardInterrupt

    # Runs of one study compile the same programs (every seed, most variants): one
    # persistent XLA cache saves their compile time, unless the caller chose one.
    env = {"JAX_COMPILATION_CACHE_DIR": os.path.join(workdir, ".xla_cache"), **os.environ}
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while todo or running:
            ready = [r for r in todo if set(r.after) <= done]
            while ready and len(running) < jobs and not failed:
                run = ready.pop(0)
                todo.remove(run)
                started = total - len(todo)
                print(f"\n=== [{started}/{total}] {run.label} ({run.kind}) -> {run.workdir}\n"
                      f"    {' '.join(run.command())}", flush=True)
                path = os.path.join(logs, f"{run.label}.log")
                with open(path, "a") as out:
                    # Own session: a terminal's Ctrl-C reaches the harness, which stops
                    # the runs with SIGTERM (they checkpoint), not the runs directly.
                    proc = subprocess.Popen(
                        run.command(), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                        env=env, start_new_session=True,
                        preexec_fn=functools.partial(_die_with_parent, os.getpid()),
                        pass_fds=(lock_fd,) if lock_fd is not None else ())
                threading.Thread(target=echo, daemon=True, args=(run, proc, path)).start()
                running[run.label] = (run, proc, time.time())
            if failed and not running:
                break
            if not running:
                blocked = ", ".join(r.label for r in todo)
                raise StudyError(f"runs {blocked} wait for runs that never finish")
            time.sleep(0.5)  # polling the children; no result depends on this interval
            for label, (run, proc, start) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[label]
                if proc.returncode == 0 and run.finished():
                    done.add(label)
                    print(f"=== {label}: finished in {time.time() - start:.0f} s", flush=True)
                    if on_finish:
                        on_finish(run)
                else:
                    failed.append(label)
                    print(f"=== {label}: FAILED (exit {proc.returncode}); log: "
                          f"{os.path.join(logs, label + '.log')}", flush=True)
    except KeyboardInterrupt:
        for _, proc, _ in running.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        print(f"stopping: {len(running)} run(s) checkpoint and exit ...", flush=True)
        for _, proc, _ in running.values():
            proc.wait()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed:
        raise StudyError(f"run(s) {', '.join(failed)} failed; their logs are in {logs}. "
                         "Finished runs are kept: fix the cause and re-run to continue")


# ----------------------------------------------------------------------------- results


def metric_names(row: dict[str, Any], metrics: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    """`row` plus the derived metrics: the study's means of keys, and "<task>/mean" (the
    mean of <task>'s top-1 keys, those whose name after the "/" has no "_")."""
    out = dict(row)
    tasks: dict[str, list[float]] = {}
    for key, value in row.items():
        task, sep, name = key.partition("/")
        if sep and "_" not in name and "/" not in name and isinstance(value, float | int):
            tasks.setdefault(task, []).append(float(value))
    for task, values in tasks.items():
        out.setdefault(f"{task}/mean", float(np.mean(values)))
    for name, keys in metrics.items():
        if all(k in row for k in keys):
            out[name] = float(np.mean([row[k] for k in keys]))
    return out


def curves(run: Run, study: Study) -> dict[str, Any]:
    """A learner's eval curve of each reported metric, with its step and own cumulative
    FLOPs at each eval, and training statistics."""
    rows = read_metrics(run.workdir)
    metrics = study.metrics
    evals = [r for r in (metric_names(r, metrics) for r in rows) if study.target in r]
    if not evals:
        logged = sorted({k for r in rows for k in metric_names(r, metrics)} - {"step"})
        raise StudyError(f"study.target={study.target!r}: run {run.label} does not log it "
                         f"({run.workdir}/metrics.jsonl). It logs: {logged}")
    flop_rows = [(0, 0.0)] + [(r["step"], r["flops"]) for r in rows if "flops" in r]
    steps = np.array([r["step"] for r in evals], np.float64)
    fsteps, fvalues = (np.array(v, np.float64) for v in zip(*flop_rows, strict=True))
    out: dict[str, Any] = {
        "step": steps.tolist(),
        "flops": np.interp(steps, fsteps, fvalues).tolist(),
        "flops_per_step": float(fvalues[-1] / fsteps[-1]) if fsteps[-1] else float("nan"),
    }
    for key in (study.target, *study.report):
        missing = [r["step"] for r in evals if key not in r]
        if missing:
            raise StudyError(f"study.report: run {run.label} does not log {key!r} at steps "
                             f"{missing[:5]}")
        out[key] = [float(r[key]) for r in evals]
    train = [r for r in rows if "loss" in r]
    for key in ("selection/clean_selected", "selection/clean_super"):
        values = [r[key] for r in train if key in r]
        out[key] = float(np.mean(values)) if values else float("nan")
    speeds = [r["steps_per_sec"] for r in train
              if math.isfinite(r.get("steps_per_sec", math.nan))]
    out["steps_per_sec"] = float(np.median(speeds)) if speeds else float("nan")
    return out


def overhead(run: Run, runs: list[Run]) -> float:
    """The FLOPs of a reference's training plus its cache pass."""
    rows = [r for r in read_metrics(run.workdir) if "flops" in r]
    total = rows[-1]["flops"] if rows else 0.0
    cache = next((r for r in runs if r.kind == "cache" and r.workdir == run.workdir), None)
    if cache is not None:
        meta = files.join(cache.config.selection.reference.cache_dir, "meta.json")
        total += files.read_json(meta).get("flops", 0.0)
    return float(total)


def analyse(study: Study, runs: list[Run]) -> dict[str, Any]:
    """Everything the report says, as plain data (the JSON)."""
    learners = [r for r in runs if r.kind == "learner"]
    refs = {r.label[len("ref_"):]: r for r in runs if r.kind == "reference"}
    users = {name: sum(r.reference == name for r in learners) for name in refs}
    share = {name: overhead(ref, runs) / (study.amortise_over or max(users[name], 1))
             for name, ref in refs.items()}
    per_run = {}
    for r in learners:
        c = curves(r, study)
        c["overhead_share"] = share.get(r.reference, 0.0)
        c["total_flops"] = [f + c["overhead_share"] for f in c["flops"]]
        per_run[r.label] = c
    seeds = list(study.seeds)
    base = {s: per_run[f"{study.baseline}_seed{s}"] for s in seeds}
    target = {s: base[s][study.target][-1] for s in seeds}
    variants: dict[str, Any] = {}
    for name in list(study.variants):
        rows = []
        for s in seeds:
            c, b = per_run[f"{name}_seed{s}"], base[s]
            reach = {x: first_crossing(c[x], c[study.target], target[s])
                     for x in ("step", "flops", "total_flops")}
            base_reach = {x: first_crossing(b[x], b[study.target], target[s])
                          for x in ("step", "flops", "total_flops")}
            # The other way round: how many baseline steps (total FLOPs) the variant's
            # final value is worth, ÷ what the variant spent; > 1: the variant's budget
            # buys more than the baseline's. Defined when the variant never reaches the
            # target too (inf when the baseline never reaches the variant's final).
            worth = {x: first_crossing(b[x], b[study.target], c[study.target][-1])
                     for x in ("step", "total_flops")}
            rows.append({
                "seed": s, "target": target[s], "final": c[study.target][-1],
                "worth_ratio": worth["step"] / c["step"][-1],
                "worth_flops_ratio": worth["total_flops"] / c["total_flops"][-1],
                "best": max(c[study.target]),
                "steps_to_target": reach["step"], "flops_to_target": reach["flops"],
                "total_flops_to_target": reach["total_flops"],
                # > 1: fewer than the baseline; 0: never reached within the run
                "step_ratio": base_reach["step"] / reach["step"],
                "flops_ratio": base_reach["flops"] / reach["flops"],
                "total_flops_ratio": base_reach["total_flops"] / reach["total_flops"],
                **{f"final:{k}": c[k][-1] for k in study.report},
            })
        summary = {}
        for key in ("final", "best", "step_ratio", "flops_ratio", "total_flops_ratio",
                    "worth_ratio", "worth_flops_ratio",
                    *(f"final:{k}" for k in study.report)):
            summary[key] = mean_ci([r[key] for r in rows])
        # Over the seeds that reached the target (the `reached` column says how many).
        reached = [r["steps_to_target"] for r in rows if math.isfinite(r["steps_to_target"])]
        summary["steps_to_target"] = mean_ci(reached) if reached else (math.inf, math.nan)
        summary["reached"] = f"{len(reached)}/{len(rows)}"
        first = per_run[f"{name}_seed{seeds[0]}"]
        variants[name] = {
            "fields": dict(study.variants[name]), "seeds": rows, "summary": summary,
            "flops_per_step": first["flops_per_step"], "overhead_share": first["overhead_share"],
            "steps_per_sec": float(np.mean([per_run[f"{name}_seed{s}"]["steps_per_sec"]
                                            for s in seeds])),
            "clean_selected": float(np.mean([per_run[f"{name}_seed{s}"][
                "selection/clean_selected"] for s in seeds])),
        }
    return {"study": study.name, "title": study.title, "target": study.target,
            "baseline": study.baseline, "seeds": seeds, "level": LEVEL,
            "reference_overhead": {n: overhead(r, runs) for n, r in refs.items()},
            # Variants reading a reference run made outside the study: not charged for it.
            "external_references": {
                r.variant: r.config.selection.reference.workdir for r in learners
                if not r.reference and r.config.selection.reference.workdir},
            "amortised_over": {n: study.amortise_over or users[n] for n in refs},
            "variants": variants, "runs": per_run}


def report(study: Study, result: dict[str, Any], command: str) -> str:
    """The markdown report of `analyse`'s result."""
    n = len(result["seeds"])
    t = result["target"]
    lines = [f"# {study.title or study.name}\n"]
    if study.command and study.command != command:
        lines.append(f"Made by `{study.command}` (this report: `{command}`).\n")
    else:
        lines.append(f"Command: `{command}`\n")
    if study.description:
        lines.append(study.description.strip() + "\n")
    lines.append(
        f"Target metric `{t}`; the target of each seed is the final value of "
        f"`{study.baseline}` with that seed. Seeds {result['seeds']}; every cell is the mean "
        f"over the {n} seeds ± the half-width of its {LEVEL:.0%} Student-t interval"
        + (" (none with one seed)" if n < 2 else "") + ". *Steps/FLOPs to target*: where "
        "the curve first reaches the target, interpolated linearly between evaluations "
        f"(every {study.eval_every} steps). *× baseline*: the baseline's steps (FLOPs) to the "
        "target ÷ the variant's, paired by seed; > 1 is faster, 0 counts a seed that never "
        "reached it. FLOPs are XLA's count of each compiled step (selection scoring "
        "included); *total* adds each run's share of its reference's training and cache "
        "pass.\n")
    for name, path in result["external_references"].items():
        lines.append(f"- `{name}` reads the reference run {path}, made outside this study: "
                     "its cost is not in its total FLOPs.")
    for name, flops in result["reference_overhead"].items():
        k = result["amortised_over"][name]
        lines.append(f"- reference `{name}`: {flops / 1e12:.3f} TFLOP (training + cache), "
                     f"charged 1/{k} to each of its learner runs.")
    lines += ["", f"| variant | {t} final | best | reached | steps to target | × baseline "
              "(steps) | × baseline (own FLOPs) | × baseline (total FLOPs) | GFLOP/step | "
              "steps/s | clean selected |", "|---|" + "---:|" * 10]
    for name, v in result["variants"].items():
        s = v["summary"]
        lines.append("| " + " | ".join([
            name, fmt(*s["final"]), fmt(*s["best"]), s["reached"],
            fmt(*s["steps_to_target"], digits=0)
            + ("" if s["reached"].split("/")[0] in ("0", s["reached"].split("/")[1])
               else f" ({s['reached']})"),
            fmt(*s["step_ratio"], digits=2),
            fmt(*s["flops_ratio"], digits=2), fmt(*s["total_flops_ratio"], digits=2),
            f"{v['flops_per_step'] / 1e9:.2f}", f"{v['steps_per_sec']:.1f}",
            "—" if math.isnan(v["clean_selected"]) else f"{v['clean_selected']:.3f}"]) + " |")
    lines += ["", f"*Worth*: the steps (total FLOPs) at which `{study.baseline}` reaches each "
              "variant's final value, ÷ the variant's own; > 1: the variant's budget buys "
              "more than the baseline's (defined whether or not the variant reaches the "
              "target; inf: the baseline never gets there).", "",
              "| variant | worth in steps | worth in total FLOPs |", "|---|---:|---:|"]
    for name, v in result["variants"].items():
        s = v["summary"]
        beyond = f"beyond {study.baseline}'s best"
        lines.append(f"| {name} | {fmt(*s['worth_ratio'], digits=2, inf=beyond)} | "
                     f"{fmt(*s['worth_flops_ratio'], digits=2, inf=beyond)} |")
    if study.report:
        lines += ["", "Final values:", "", "| variant | " + " | ".join(study.report) + " |",
                  "|---|" + "---:|" * len(study.report)]
        for name, v in result["variants"].items():
            lines.append(f"| {name} | " + " | ".join(
                fmt(*v["summary"][f"final:{k}"]) for k in study.report) + " |")
    lines += ["", "Per seed:", "", "| variant | seed | target | final | steps to target | "
              "own TFLOP to target | × baseline (steps) | × baseline (total FLOPs) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, v in result["variants"].items():
        for r in v["seeds"]:
            lines.append(f"| {name} | {r['seed']} | {r['target']:.3f} | {r['final']:.3f} | "
                         f"{fmt(r['steps_to_target'], math.nan, 0)} | "
                         f"{fmt(r['flops_to_target'] / 1e12, math.nan, 3)} | "
                         f"{r['step_ratio']:.2f} | {r['total_flops_ratio']:.2f} |")
    lines += ["", f"![{t} against steps]({study.name}_steps.png)",
              f"![{t} against total FLOPs]({study.name}_flops.png)"]
    return "\n".join(lines) + "\n"


def plot(study: Study, result: dict[str, Any], out: str) -> list[str]:
    """The target (and reported metrics) against steps and against total FLOPs: the mean
    over seeds, with the 95% interval shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [result["target"], *[k for k in study.report if k != result["target"]]][:6]
    paths = []
    for x, label, suffix in (("step", "learner steps", "steps"),
                             ("total_flops", "total FLOPs (XLA; reference amortised)", "flops")):
        fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
        for ax, key in zip(axes[0], keys, strict=True):
            for name in result["variants"]:
                runs = [result["runs"][f"{name}_seed{s}"] for s in result["seeds"]]
                ys = np.array([r[key] for r in runs])
                xs = np.mean([r[x] for r in runs], axis=0)
                mean = ys.mean(0)
                ax.plot(xs, mean, marker=".", label=name)
                if len(runs) > 1:
                    half = np.array([mean_ci(col)[1] for col in ys.T])
                    ax.fill_between(xs, mean - half, mean + half, alpha=0.15)
            ax.set_title(key + (" (target)" if key == result["target"] else ""))
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out, f"{study.name}_{suffix}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", help="a study file, path.py[:arg] (configs/studies/)")
    parser.add_argument("--workdir", default="", help="run dirs (default runs/<study>); "
                        "gs:// works with --dry-run")
    parser.add_argument("--out", default="", help="report dir (default <workdir>/results)")
    parser.add_argument("--seeds", default="", help="comma-separated; replaces the study's")
    parser.add_argument("--only", default="", help="comma-separated variants (and the "
                        "baseline) to run and report")
    parser.add_argument("--target", default="", help="replaces the study's target metric")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a config field on every run (repeatable)")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1) // 4),
                        help="runs at once (default: a quarter of the cores, at least 1)")
    parser.add_argument("--dry-run", action="store_true", help="write the run configs and "
                        "print the commands (e.g. for a TPU pod); train nothing")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing; report the finished runs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    path, _, arg = args.study.partition(".py:")
    path = path if path.endswith(".py") else path + ".py"
    try:
        study = load_study(path, arg)
        if args.seeds:
            study.seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
        if args.target:
            study.target = args.target
        if args.only:
            keep = set(args.only.split(",")) | {study.baseline}
            unknown = sorted(keep - set(study.variants))
            if unknown:
                raise StudyError(f"--only: no variant(s) {unknown}; variants: "
                                 f"{list(study.variants)}")
            study.variants = {k: v for k, v in study.variants.items() if k in keep}
        workdir = args.workdir or os.path.join("runs", study.name)
        if "://" not in workdir:  # the runs start in the repository root
            workdir = os.path.abspath(workdir)
        if "://" in workdir and not (args.dry_run or args.report_only):
            raise StudyError(f"--workdir {workdir!r}: the harness runs studies in a local "
                             "workdir; for a bucket (a pod), use --dry-run and run the "
                             "printed commands there")
        runs = plan(study, workdir, tuple(args.set))
        check_target(study, runs)
    except StudyError as e:
        sys.exit(f"error: {e}")
    command = "python experiments/compare.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    if args.dry_run:
        try:
            for run in runs:
                prepare(run)
        except StudyError as e:
            sys.exit(f"error: {e}")
        print(f"# {len(runs)} runs of {study.name}; run each once its `after` runs have "
              "finished (on a pod: the same command on every host)")
        for run in runs:
            after = f"   # after {', '.join(run.after)}" if run.after else ""
            print(" ".join(["python", *run.command()[1:]]) + after)
        return None
    start = time.time()
    try:
        if args.report_only:  # reads only, so it needs no lock: works while runs train
            for run in runs:
                prepare(run, write=False)
        else:
            with workdir_lock(workdir) as fd:
                for run in runs:
                    prepare(run)
                execute(runs, workdir, max(args.jobs, 1), fd)
        missing = [r.label for r in runs if not r.finished()]
        if missing:
            raise StudyError(f"runs not finished: {missing}; run without --report-only")
        result = analyse(study, runs)
    except StudyError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("stopped: the runs checkpointed; re-run the same command to continue")
    out = args.out or os.path.join(workdir, "results")
    os.makedirs(out, exist_ok=True)
    result["command"] = command
    result["wall_seconds"] = time.time() - start
    text = report(study, result, command)
    files.write_atomically(os.path.join(out, f"{study.name}.md"), text)
    files.write_atomically(os.path.join(out, f"{study.name}.json"),
                           json.dumps(_json_safe(result), indent=1))
    plot(study, result, out)
    print("\n" + text)
    print(f"wall time {result['wall_seconds'] / 60:.1f} min; report in {out}")
    return result


if __name__ == "__main__":
    main()
