"""Faults a long run must survive: non-finite steps, preemption, an unusable workdir.

What is guaranteed, and the test of each guarantee, is in docs/reliability.md.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import jax
import jax.numpy as jnp

from jest_jax.metrics import log
from jest_jax.scoring import SCORES_OK

# What the step checks, in causal order: the first non-finite one is the cause of the rest.
NONFINITE_QUANTITIES = ("selection scores", "loss", "gradients", "updated state")
NONFINITE = "faults/nonfinite"  # per-step metric: bit i set <=> NONFINITE_QUANTITIES[i] is bad
# Test-only (docs/reliability.md): SIGKILL this process while the checkpoint of this step
# is being written, to prove a half-written checkpoint is never resumed from.
KILL_IN_SAVE_ENV = "JEST_JAX_TEST_KILL_IN_SAVE"

Step = Callable[[Any, Any, Any], tuple[Any, dict]]


class WorkdirError(OSError):
    """The workdir cannot be created or written: found at start-up, before training."""


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


def guard_step(step: Step, policy: str) -> Step:
    """`step` that also reports non-finite quantities as the `faults/nonfinite` bitmask.

    With policy "skip", a step with any of them keeps the previous params and optimizer
    state (the step counter still advances, so the next step draws the next batch and
    its own selection key); "stop" leaves the decision to the host (the training loop
    raises `NonFiniteLossError` when it reads the mask).
    Skipping keeps the old state alive next to the new one: one extra state in memory.
    """

    def guarded(state: dict, batch: Any, reference: Any) -> tuple[dict, dict]:
        new, metrics = step(state, batch, reference)
        bad = [~metrics.pop(SCORES_OK, jnp.array(True)),
               ~jnp.isfinite(metrics["loss"]),
               ~jnp.isfinite(metrics["grad_norm"]),
               ~_all_finite({k: v for k, v in new.items() if k != "step"})]
        code = sum(b.astype(jnp.int32) << i for i, b in enumerate(bad))
        metrics[NONFINITE] = code
        if policy == "skip":
            ok = code == 0
            new = {k: v if k == "step" else
                   jax.tree.map(lambda n, o: jnp.where(ok, n, o), v, state[k])
                   for k, v in new.items()}
        return new, metrics

    return guarded


def nonfinite_quantities(code: int) -> list[str]:
    """The names set in a `faults/nonfinite` bitmask, first cause first."""
    return [name for i, name in enumerate(NONFINITE_QUANTITIES) if code >> i & 1]


class Preemption:
    """Tells the loop when to checkpoint and exit because the machine is going away.

    Enter it before anything slow (setup, restore, compilation), so a notice that comes
    early is not lost: the first step still runs, then the checkpoint is written.

    Plain single process: SIGTERM (what a TPU VM receives before preemption) sets a flag
    the loop reads after each step. With `jax.distributed` initialised (every multi-host
    run, and a single TPU VM, where `main` initialises it too), JAX's own notifier owns
    SIGTERM and hosts would see it at different steps, so the loop asks `sync_point`
    (orbax's `reached_preemption`, JAX's preemption sync point) where all hosts agree on
    the step; no Python handler is installed then. The previous handler is restored on exit.
    """

    def __init__(self) -> None:
        self.sync_point: Callable[[int], bool] = lambda step: False
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

    def reached(self, step: int) -> bool:
        """Whether to checkpoint after `step` and stop (call after every step, on all hosts)."""
        if not self._installed:
            return self.sync_point(step)
        if self._signal is not None and not self._told:
            self._told = True
            log("SIGTERM received: checkpointing after this step and exiting")
        return self._signal is not None


def distributed_initialized() -> bool:
    """Whether `jax.distributed.initialize` has run in this process."""
    from jax._src import distributed  # no public query exists (jax 0.10)

    return distributed.global_state.client is not None


def check_writable(workdir: str) -> None:
    """WorkdirError unless `workdir` (and its checkpoints/, if there) can be written.

    URLs ("gs://...") are refused: the workdir is read and written with `os` (metrics,
    config, the checkpoint bookkeeping), which would silently turn `gs://b/x` into a
    local directory `gs:/b/x`. Mount the bucket instead (gcsfuse, docs/tpu.md).
    """
    if "://" in workdir:
        raise WorkdirError(
            f"--workdir {workdir!r} is a URL; workdirs must be file system paths. Mount the "
            "bucket (e.g. gcsfuse, docs/tpu.md) and pass the mounted path")
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


def maybe_kill_in_save(step: int, checkpoint_dir: str) -> None:
    """Test hook (JEST_JAX_TEST_KILL_IN_SAVE=<step>): SIGKILL once orbax has begun writing
    the checkpoint of `step` in the background, before it is committed."""
    if os.environ.get(KILL_IN_SAVE_ENV) != str(step):
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the temporary dir appears when the write starts
        if any(name.startswith(f"{step}.orbax-checkpoint-tmp")
               for name in os.listdir(checkpoint_dir)):
            break
        time.sleep(0.001)
    os.kill(os.getpid(), signal.SIGKILL)
