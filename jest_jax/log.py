"""The one logging channel: notes, warnings and progress lines.

Everything jest_jax reports goes through the `jest_jax` logger of Python's `logging`:
notes and progress to stdout, warnings (prefixed `warning: `) to stderr, each as one
plain line. Every process runs the same program, so only process 0 speaks, unless a
message is about what this process alone met (`every_process=True`: a bad record it
read, a dataset it built). Silence or redirect it like any logger:
`logging.getLogger("jest_jax").setLevel(logging.WARNING)`.

While a run trains, process 0 also writes every line to `log.txt` in its workdir
(`FileLog`), appended across restarts, so the log survives the machine (a bucket
included).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import jax

from jest_jax import files

LOGGER = logging.getLogger("jest_jax")


class _Console(logging.Handler):
    """Writes to the *current* sys.stdout / sys.stderr, so redirection (and pytest's
    capture) sees what is logged after the handler was made."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        stream.write(self.format(record) + "\n")
        stream.flush()


if not LOGGER.handlers:
    LOGGER.addHandler(_Console())
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False  # absl's root handler would print everything a second time


class FileLog(logging.Handler):
    """Every line logged while it is entered, also in a text file (`attach`), appended
    across restarts: `workdir/log.txt`. Lines logged before `attach` (set-up) are kept and
    written when it comes; an error that ends the run is written last.

    Through `files.TextLog`: locally each line is appended at once; in a bucket, where an
    object cannot be appended to, each line uploads the whole text again (the lines are
    few: progress every `logging.every_steps`, notes, warnings). Process 0 only."""

    def __init__(self) -> None:
        super().__init__()
        self._log: files.TextLog | None = None
        self._pending: list[str] = []

    def __enter__(self) -> FileLog:
        if jax.process_index() == 0:
            # First: a line shown on the console is already in the file (or its upload).
            LOGGER.handlers.insert(0, self)
        return self

    def attach(self, path: str) -> None:
        """Write to `path` from now on (and what was logged since entering)."""
        if jax.process_index() != 0:
            return
        with self.lock:
            self._log = files.TextLog(path)
            self._log.append(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} started ---\n"
                             + "".join(self._pending))
            self._pending = []
            self._log.flush()

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record) + "\n"
        if self._log is None:
            self._pending.append(line)
            return
        try:
            self._log.append(line)
            self._log.flush()
        except Exception:  # noqa: BLE001 - a failed upload must not stop training
            self.handleError(record)  # logging's report on stderr; the next flush retries

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        LOGGER.removeHandler(self)
        if self._log is not None and error is not None and not isinstance(error, KeyboardInterrupt):
            try:
                self._log.append(f"error: {error}\n")
                self._log.flush()
            except Exception:  # noqa: BLE001, S110 - the error itself is what must surface
                pass


def _speaks(every_process: bool) -> bool:
    return every_process or jax.process_index() == 0


def info(message: str, *, every_process: bool = False) -> None:
    """A note or progress line (stdout)."""
    if _speaks(every_process):
        LOGGER.info(message)


def warning(message: str, *, every_process: bool = False) -> None:
    """Something the user should know went wrong but was handled (stderr)."""
    if _speaks(every_process):
        LOGGER.warning(f"warning: {message}")


class Progress:
    """Periodic one-line progress reports: step, steps/s, ETA and chosen metrics."""

    def __init__(self, total_steps: int, first_step: int):
        self.total = total_steps
        self._last_step = first_step
        self._last_time = time.perf_counter()
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
        info(f"[{step:>6}/{self.total}] {self.steps_per_sec:6.2f} steps/s "
             f"ETA {_duration(eta)}  {shown}")


def _fmt(value: Any) -> str:
    if hasattr(value, "item"):
        value = value.item()
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{sec:02d}" if hours else f"{minutes:02d}:{sec:02d}"
