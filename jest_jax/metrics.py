"""Metric writers (JSONL, TensorBoard without TensorFlow), progress lines, FLOP counts."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import jax


def log(message: str) -> None:
    """Print on process 0 only (every process runs the same loop)."""
    if jax.process_index() == 0:
        print(message, flush=True)


class MetricWriter:
    """Appends `{"step": s, name: value, ...}` lines to `workdir/metrics.jsonl` and
    mirrors scalars to TensorBoard event files. Only process 0 writes."""

    def __init__(self, workdir: str, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.active and tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.active:
            return
        scalars = {k: _scalar(v) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def truncate_after(self, step: int) -> None:
        """Drop rows past `step`: a resumed run re-logs the steps after its checkpoint."""
        if not self.active or not os.path.exists(self.path):
            return
        rows = read_metrics(os.path.dirname(self.path))
        # A kill mid-rewrite must not lose the history.
        write_atomically(self.path, "".join(json.dumps(r) + "\n" for r in rows
                                            if r["step"] <= step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _scalar(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    return value


def write_atomically(path: str, text: str) -> None:
    """A reader (or a run killed mid-write) sees the old file or the new, never half."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All rows of `workdir/metrics.jsonl` (empty if none yet)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")
    # A run killed mid-write may leave a last line without its newline: not a row yet.
    return [json.loads(line) for line in lines[:-1] if line.strip()]


class Progress:
    """Periodic one-line progress reports: step, steps/s, ETA and chosen metrics."""

    def __init__(self, total_steps: int, first_step: int, stream: TextIO | None = None):
        self.total = total_steps
        self._last_step = first_step
        self._last_time = time.perf_counter()
        self._stream = stream
        self.steps_per_sec = float("nan")

    def restart_clock(self, step: int) -> None:
        """Measure the next rate from here: evals and checkpoints do not count as steps."""
        self._last_step, self._last_time = step, time.perf_counter()

    def update(self, step: int, metrics: Mapping[str, Any]) -> None:
        now = time.perf_counter()
        if step > self._last_step:
            self.steps_per_sec = (step - self._last_step) / (now - self._last_time)
        self._last_step, self._last_time = step, now
        eta = (self.total - step) / self.steps_per_sec if self.steps_per_sec > 0 else float("nan")
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
        if jax.process_index() == 0:
            print(f"[{step:>6}/{self.total}] {self.steps_per_sec:6.2f} steps/s "
                  f"ETA {_duration(eta)}  {shown}", file=self._stream or sys.stdout, flush=True)


def _fmt(value: Any) -> str:
    value = _scalar(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{sec:02d}" if hours else f"{minutes:02d}:{sec:02d}"


def compiled_flops(compiled: Any) -> float:
    """FLOPs of one call of a compiled XLA executable, from its cost analysis."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax returned one dict per device program
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops", float("nan"))
    return float(flops)
