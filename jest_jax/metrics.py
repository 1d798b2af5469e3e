"""Metric writers (JSONL, TensorBoard without TensorFlow), FLOP counts and the input-wait meter."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import ml_collections

from jest_jax import files, log
from jest_jax.fields import Section

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
    mirrors scalars to TensorBoard event files in `workdir/tensorboard`. Only process 0
    writes. The workdir may be a bucket (docs/reliability.md §3a says how each is kept whole).

    `metrics.jsonl` is a `files.TextLog`: locally each row is one whole-line append (a run
    killed mid-append leaves a torn last line, which `read_metrics` never returns as a
    row); in a bucket the whole file is uploaded again after each row. `truncate_after`,
    run at every start, drops the rows and TensorBoard events a killed run logged after
    its checkpoint, so a resumed run shows no step twice.

    TensorBoard events are written by tensorboardX into a local directory: the workdir's,
    or, for a bucket, a temporary one whose event files are uploaded whole after each row.
    """

    def __init__(self, workdir: str, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.workdir = workdir
        self._log = files.TextLog(files.join(workdir, "metrics.jsonl")) if self.active else None
        self._tensorboard = self.active and tensorboard
        self._tb = None  # made at the first row: after `truncate_after` has cleaned up
        self._tb_local = ""

    def _writer(self):
        if self._tb is None:
            from tensorboardX import SummaryWriter

            target = files.join(self.workdir, "tensorboard")
            self._tb_local = (tempfile.mkdtemp(prefix="jest_jax_tensorboard_")
                              if files.is_url(target) else target)
            # The pid keeps the file names of two starts within one second apart.
            self._tb = SummaryWriter(self._tb_local, filename_suffix=f".{os.getpid()}")
        return self._tb

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.active:
            return
        scalars = {k: _scalar(v) for k, v in metrics.items()}
        self._log.append(json.dumps({"step": step, **scalars}) + "\n")
        self._log.flush()
        if self._tensorboard:
            tb = self._writer()
            for k, v in scalars.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    tb.add_scalar(k, v, step)
            tb.flush()
            self._upload_events()

    def _upload_events(self) -> None:
        """For a bucket: each local event file, whole, over its object."""
        target = files.join(self.workdir, "tensorboard")
        if files.is_url(target):
            for name in os.listdir(self._tb_local):
                with open(os.path.join(self._tb_local, name), "rb") as f:
                    files.write_atomically(files.join(target, name), f.read())

    def truncate_after(self, step: int) -> None:
        """Drop rows and TensorBoard events past `step`: a resumed run logs the steps after
        its checkpoint again."""
        if not self.active:
            return
        text = self._log.read()
        if text:
            rows = _parse_rows(text)
            # A kill mid-rewrite must not lose the history: `rewrite` is atomic.
            self._log.rewrite("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step))
        events = files.join(self.workdir, "tensorboard")
        for name in files.listdir(events):
            if ".tfevents." in name:
                path = files.join(events, name)
                data = files.read_bytes(path)
                kept = events_up_to(data, step)
                if kept != data:
                    files.write_atomically(path, kept)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._upload_events()
            if files.is_url(self.workdir):
                shutil.rmtree(self._tb_local, ignore_errors=True)


def _scalar(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    return value


def _parse_rows(text: str) -> list[dict[str, Any]]:
    # A run killed mid-write may leave a last line without its newline: not a row yet.
    return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All rows of `workdir/metrics.jsonl` (empty if none yet)."""
    path = files.join(workdir, "metrics.jsonl")
    return _parse_rows(files.read_text(path)) if files.exists(path) else []


def event_records(data: bytes) -> list[bytes]:
    """The whole records of a TensorBoard event file (TFRecord framing: length, its CRC,
    the serialised `Event`, its CRC); a torn last record (a killed writer) is left out."""
    records, at = [], 0
    while at + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[at:at + 8])
        end = at + 12 + length + 4
        if end > len(data):
            break
        records.append(data[at:end])
        at = end
    return records


def events_up_to(data: bytes, step: int) -> bytes:
    """An event file's bytes without its events past `step` (records copied unchanged)."""
    from tensorboardX.proto.event_pb2 import Event

    return b"".join(r for r in event_records(data) if Event.FromString(r[12:-4]).step <= step)


class StepProfile:
    """`--profile_steps=A:B`: a jax.profiler trace of training steps A to B (inclusive)
    into `workdir/profile`, where TensorBoard's profile plugin finds it
    (`profile/plugins/profile/<time>/<host>.xplane.pb`). For a bucket the trace is
    written to a local temporary directory and uploaded, file by file, once it ends.

    Only process 0 traces. A run resumed past A traces from its first step up to B; one
    resumed past B traces nothing.
    """

    def __init__(self, steps: tuple[int, int] | None, workdir: str, start: int):
        self.first, self.last = steps if steps else (0, -1)
        self.first = max(self.first, start + 1)
        self.target = files.join(workdir, "profile")
        self._local = ""
        if steps and jax.process_index() == 0 and self.first > self.last:
            log.info(f"note: --profile_steps={steps[0]}:{steps[1]} lies before the resumed "
                     f"step {start}; no profile is taken")

    def before(self, step: int) -> None:
        """Call before dispatching `step`."""
        if step == self.first and step <= self.last and jax.process_index() == 0:
            self._local = (tempfile.mkdtemp(prefix="jest_jax_profile_")
                           if files.is_url(self.target) else self.target)
            jax.profiler.start_trace(self._local)

    def after(self, step: int, outputs: Any) -> None:
        """Call after dispatching `step` (its `outputs` are waited for at the last one)."""
        if step == self.last and self._local:
            jax.block_until_ready(outputs)
            self.stop()

    def stop(self) -> None:
        """End a trace in progress (at B, or when the loop stops before it)."""
        if not self._local:
            return
        jax.profiler.stop_trace()
        if self._local != self.target:
            files.copy_tree(self._local, self.target)
            shutil.rmtree(self._local, ignore_errors=True)
        log.info(f"wrote the profile of --profile_steps to {self.target}")
        self._local = ""


def compiled_flops(compiled: Any) -> float:
    """FLOPs of one call of a compiled XLA executable, from its cost analysis (a lowered
    program works too: XLA's count before optimisation)."""
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
