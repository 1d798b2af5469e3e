"""Metric writers (JSONL, TensorBoard without TensorFlow), FLOP counts and the input-wait meter."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import ml_collections

from jest_jax.fields import Section
from jest_jax.files import write_atomically

# Training-row fields measured by the wall clock: the only ones that differ between two
# runs of the same config (a resumed run and an uninterrupted one, say).
WALL_CLOCK = ("steps_per_sec", "data_wait")


class DataWait:
    """`data_wait`: the fraction of wall time the host's training loop spends waiting
    for its next input batch, per logging interval.

    It is the host's wait, not the device's idle time: steps are dispatched
    asynchronously, so the device may still be running queued steps while the host
    waits. Near 0: the input pipeline keeps ahead. Near 1: the host spends the interval
    waiting for input, so the pipeline is likely what limits the step rate. Evaluations
    and checkpoint writes are left out of the interval (`restart`).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._waited = 0.0
        self._since = clock()

    def next(self, iterator: Iterator) -> Any:
        """`next(iterator)`, timed."""
        start = self._clock()
        try:
            return next(iterator)
        finally:
            self._waited += self._clock() - start

    def restart(self) -> None:
        """Measure the next interval from here."""
        self._waited, self._since = 0.0, self._clock()

    def fraction(self) -> float:
        """Waiting / elapsed since the last call (or restart); starts the next interval."""
        elapsed = self._clock() - self._since
        out = min(1.0, self._waited / elapsed) if elapsed > 0 else 0.0
        self.restart()
        return out


@dataclasses.dataclass(frozen=True)
class LoggingSpec:
    """`config.logging`: how often a training row is logged, and where to."""

    every_steps: int
    tensorboard: bool

    @staticmethod
    def defaults() -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        c.every_steps = 10           # progress line + metrics.jsonl row every N steps
        c.tensorboard = True         # also write TensorBoard event files (no TensorFlow needed)
        return c

    @classmethod
    def from_config(cls, section: Section) -> LoggingSpec:
        return cls(section.integer("every_steps", 1), section.boolean("tensorboard"))


class MetricWriter:
    """Appends `{"step": s, name: value, ...}` lines to `workdir/metrics.jsonl` and
    mirrors scalars to TensorBoard event files. Only process 0 writes.

    Each row is one whole-line append; a run killed mid-append leaves a torn last line,
    which `read_metrics` never returns as a row and `truncate_after` (run at every start)
    removes by an atomic rewrite."""

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


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All rows of `workdir/metrics.jsonl` (empty if none yet)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")
    # A run killed mid-write may leave a last line without its newline: not a row yet.
    return [json.loads(line) for line in lines[:-1] if line.strip()]


def compiled_flops(compiled: Any) -> float:
    """FLOPs of one call of a compiled XLA executable, from its cost analysis."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax returned one dict per device program
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops", float("nan"))
    return float(flops)


def a4_step_ratio(candidates_per_example: float = 0.0, score_cost: float = 1.0,
                  low_res_fraction: float = 0.0, low_res_cost: float = 1.0) -> float:
    """The paper's §A.4 accounting of one step's FLOPs, as a multiple of a uniform step.

    With `F` one example's forward pass at full resolution and `3F` its training step
    (forward + backward), a uniform step costs `3F·b`. Scoring `N` candidates with a
    cached reference runs the learner forward on each, at `score_cost`·F (the scoring
    patch size's share of F); training `λ·b` of the batch at `low_res_cost`·F:

        ratio = [(N/b)·r_s + 3·(λ·r_t + 1 - λ)] / 3

    `candidates_per_example` is N/b (0: no scoring). The scoring forward is not reused
    for the update (this trainer recomputes it), so JEST at f = 0.8 is (5 + 3)/3 = 2.67;
    Flexi-JEST with r_s = r_t = 0.28 (the paper's B/16 at patch 32) and λ = 0.5 is 1.11.
    """
    scoring = candidates_per_example * score_cost
    update = 3 * (low_res_fraction * low_res_cost + 1 - low_res_fraction)
    return (scoring + update) / 3
