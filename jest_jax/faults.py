"""Faults a long run must survive: non-finite steps, preemption, an unusable workdir.

What is guaranteed, and the test of each guarantee, is in docs/reliability.md.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import tempfile
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from jest_jax import files, log
from jest_jax.fields import Section

NONFINITE_POLICIES = ("stop", "skip")
BAD_RECORD_POLICIES = ("skip", "error")


class WorkdirError(OSError):
    """The workdir cannot be created or written: found at start-up, before training."""


@dataclasses.dataclass(frozen=True)
class FaultPolicy:
    """`config.faults`: what a run does about NaN/Inf and about bad training records."""

    nonfinite: str
    bad_records: str

    @staticmethod
    def defaults() -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()  # docs/reliability.md
        c.nonfinite = "stop"     # NaN/Inf in selection scores, loss, gradients or new params:
        #                          stop (error naming the step and the first such quantity)
        #                          | skip (keep params and optimizer state, count the step)
        c.bad_records = "skip"   # data.train record with an unreadable image, a wrong image
        #                          shape, an empty or over-long caption: skip (logged with its
        #                          index, counted, replaced by the next good record) | error
        return c

    @classmethod
    def from_config(cls, section: Section) -> FaultPolicy:
        return cls(section.choice("nonfinite", NONFINITE_POLICIES),
                   section.choice("bad_records", BAD_RECORD_POLICIES))

    @property
    def stop_on_nonfinite(self) -> bool:
        """Stop the run at a step that failed a check (else skip its update)."""
        return self.nonfinite == "stop"

    @property
    def skip_bad_records(self) -> bool:
        """Replace a bad training record by the next good one (else stop at it)."""
        return self.bad_records == "skip"


class Health(NamedTuple):
    """What one step checked, each a bool[] that is True when all finite.

    In causal order: the first one that is False is the cause of the rest.
    """

    scores: jax.Array    # selection scores: no NaN or +inf (-inf means "never pick")
    loss: jax.Array
    gradients: jax.Array
    state: jax.Array     # the updated params and optimizer state

    def ok(self) -> jax.Array:
        return self.scores & self.loss & self.gradients & self.state

    def failed(self) -> list[str]:
        """The names of the failed checks, first cause first (host values)."""
        return [NAMES[name] for name in self._fields if not bool(getattr(self, name))]


NAMES = {"scores": "selection scores", "loss": "loss", "gradients": "gradients",
         "state": "updated state"}


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


def check(scores_ok: jax.Array, loss: jax.Array, grad_norm: jax.Array, new: dict) -> Health:
    """The `Health` of a step from its selection-scores flag, loss, gradient norm and new
    state (inside the jitted step)."""
    return Health(scores_ok, jnp.isfinite(loss), jnp.isfinite(grad_norm),
                  _all_finite({k: v for k, v in new.items() if k != "step"}))


def apply_policy(policy: FaultPolicy, health: Health, new: dict, old: dict) -> dict:
    """The state to continue from. Skipping: a step that failed a check keeps the previous
    params and optimizer state (the step counter still advances, so the next step draws
    the next batch and its own selection key). Stopping keeps the new state and leaves the
    decision to the host (the loop raises `NonFiniteLossError` when it reads the health).
    Skipping keeps the old state alive next to the new one: one extra state in memory.
    """
    if policy.stop_on_nonfinite:
        return new
    ok = health.ok()
    return {k: v if k == "step" else jax.tree.map(lambda n, o: jnp.where(ok, n, o), v, old[k])
            for k, v in new.items()}


class Preemption:
    """Tells the loop when to checkpoint and exit because the machine is going away.

    Enter it before anything slow (setup, restore, compilation), so a notice that comes
    early is not lost: the first step still runs, then the checkpoint is written.

    Plain single process: SIGTERM (what a TPU VM receives before preemption) sets a flag
    the loop reads after each step. With `jax.distributed` initialised (every multi-host
    run, and a single TPU VM, where `main` initialises it too), JAX's own notifier owns
    SIGTERM and hosts would see it at different steps, so the loop asks `sync_point`
    (orbax's `reached_preemption`, JAX's preemption sync point) where all hosts agree on
    the step (given to `reached`); no Python handler is installed then. The previous handler is
    restored on exit.
    """

    def __init__(self) -> None:
        self._signal: int | None = None
        self._previous: Any = None
        self._installed = False
        self._told = False

    def __enter__(self) -> Preemption:
        # Python only delivers signals to the main thread; elsewhere the default stays.
        if (not distributed_initialized()
                and threading.current_thread() is threading.main_thread()):
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            # None: the previous handler was not installed from Python; the default it is.
            signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)
            self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only set the flag: printing here could re-enter a print the loop is in.
        del frame
        self._signal = signum

    def reached(self, step: int, sync_point: Callable[[int], bool]) -> bool:
        """Whether to checkpoint after `step` and stop (call after every step, on all hosts);
        `sync_point(step)` answers when JAX's notifier owns SIGTERM."""
        if not self._installed:
            return sync_point(step)
        if self._signal is not None and not self._told:
            self._told = True
            log.info("SIGTERM received: checkpointing after this step and exiting")
        return self._signal is not None


def distributed_initialized() -> bool:
    """Whether `jax.distributed.initialize` has run in this process."""
    from jax._src import distributed  # no public query exists (jax 0.10)

    return distributed.global_state.client is not None


def check_writable(workdir: str) -> None:
    """WorkdirError unless `workdir` (and its checkpoints/, if there) can be written:
    a local directory, or a bucket path (`gs://bucket/...`).

    Found at start-up by writing (and deleting) a small file there: locally in the
    directory itself (and its checkpoints/); in a bucket one object under the workdir,
    which fails when the bucket does not exist or this account may not write to it.
    """
    if files.is_url(workdir):
        # Named per process of the run: the workers of a pod may share pids.
        probe = files.join(workdir, f".write-test-{jax.process_index()}-{os.getpid()}")
        try:
            files.write_atomically(probe, "")
            files.remove(probe)
        except Exception as e:  # noqa: BLE001 - gcsfs/google-auth raise many types
            raise WorkdirError(
                f"--workdir {workdir!r} is not writable: {probe!r}: {_why(e)}; nothing was "
                "trained. Check that the bucket exists and that this machine's account may "
                "create objects in it") from None
        return
    for path in (workdir, os.path.join(workdir, "checkpoints")):
        if path != workdir and not os.path.isdir(path):
            continue
        try:
            os.makedirs(path, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
                pass
        except OSError as e:
            raise WorkdirError(
                f"--workdir {workdir!r} is not writable: {path!r}: {e.strerror or e}; "
                "nothing was trained. Choose a directory this user can create and write "
                "in") from None


def _why(error: Exception) -> str:
    """A storage error in one line: gcsfs names a missing bucket only by the URL it asked."""
    if isinstance(error, FileNotFoundError):
        return "the bucket does not exist (FileNotFoundError)"
    first = (str(error).strip().splitlines() or [""])[0][:200]
    return f"{type(error).__name__}: {first}"
