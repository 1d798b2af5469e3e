"""orbax checkpoints holding the train state next to the grain iterator state."""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jest_jax import files, log
from jest_jax.fields import Section


class CheckpointError(RuntimeError):
    """No checkpoint of a workdir that has some can be restored."""


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    """`config.checkpoint`: how often the run is saved, and how many saves are kept."""

    every_steps: int
    max_to_keep: int

    @staticmethod
    def defaults() -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        c.every_steps = 100          # also at the last step; a re-run resumes from the latest
        c.max_to_keep = 3            # older checkpoints are deleted
        return c

    @classmethod
    def from_config(cls, section: Section) -> CheckpointSpec:
        return cls(section.integer("every_steps", 1), section.integer("max_to_keep", 1))

    def due(self, step: int) -> bool:
        return step % self.every_steps == 0


def latest_step(workdir: str) -> int | None:
    """The newest committed checkpoint step in `workdir` (a cheap directory scan), or None."""
    directory = files.join(workdir, "checkpoints")
    names = files.listdir(directory)
    steps = [int(d) for d in names if d.isdigit() and _committed(directory, d)]
    return max(steps) if steps else None


def _committed(directory: str, name: str) -> bool:
    """Whether the step directory `name` is a finished save. Locally orbax writes into
    `<step>.orbax-checkpoint-tmp-*` and renames, so a `<step>` is finished; a bucket has
    no rename, and orbax writes `<step>/` directly and `commit_success.txt` last."""
    return not files.is_url(directory) or files.exists(
        files.join(directory, name, "commit_success.txt"))


class Checkpointer:
    """`workdir/checkpoints/<step>/{state,data,counters}`; all processes take part (orbax).

    `counters` is a small JSON item of run totals (skipped steps, bad records) that must
    survive a restart like the state does.
    """

    def __init__(self, workdir: str, max_to_keep: int = 3, owner: bool = False):
        self.directory = files.join(files.absolute(workdir), "checkpoints")  # or a bucket
        # A write killed half-way leaves `<step>.orbax-checkpoint-tmp-*`: never a step
        # orbax lists. The run training in `workdir` (`owner`) removes them so they cannot
        # pile up; a reader (eval, a learner loading its reference) must not, as it could
        # be the write in progress of a run still training there.
        if owner and jax.process_index() == 0:
            partial = [n for n in files.listdir(self.directory) if ".orbax-checkpoint-tmp" in n
                       or (n.isdigit() and not _committed(self.directory, n))]
            if partial:
                log.warning(f"removing {len(partial)} half-written checkpoint(s) in "
                            f"{self.directory} ({', '.join(partial)}): a save was interrupted "
                            "there")
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               cleanup_tmp_directories=owner)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest committed checkpoint's step, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any | None = None,
             counters: dict[str, int] | None = None) -> None:
        """Save asynchronously (arrays are copied to host first, so donation is safe)."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if counters is not None:
            items["counters"] = ocp.args.JsonSave(counters)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, abstract_state: Any, data_iterator: Any | None = None,
                step: int | None = None) -> Any:
        """Restore `state` (shaped and sharded like `abstract_state`) and, if given,
        the data iterator in place. Defaults to the latest step."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if data_iterator is not None:
            self._check_process_count(step)
        return self._restore(abstract_state, data_iterator, step)[0]

    def restore_params(self, abstract_params: Any, step: int) -> Any:
        """Only the params of the state saved at `step`, shaped and placed like
        `abstract_params`: no optimizer state is built or read (a frozen reference, an
        evaluation)."""
        item = {"params": abstract_params}
        args = ocp.args.PyTreeRestore(
            item=item, partial_restore=True,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item))
        reader = ocp.PyTreeCheckpointer()
        try:
            restored = reader.restore(files.join(self.directory, str(step), "state"), args=args)
        finally:
            reader.close()
        return restored["params"]

    def _restore(self, abstract_state: Any, data_iterator: Any | None,
                 step: int) -> tuple[Any, dict[str, int]]:
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        has_counters = files.is_dir(files.join(self.directory, str(step), "counters"))
        if has_counters:  # absent in checkpoints written before counters existed
            items["counters"] = ocp.args.JsonRestore()
        out = self._manager.restore(step, args=ocp.args.Composite(**items))
        return out["state"], (dict(out["counters"]) if has_counters else {})

    def restore_latest_good(self, abstract_state: Any, data_iterator: Any | None = None
                            ) -> tuple[int, Any, dict[str, int]] | None:
        """(step, state, counters) of the newest checkpoint that restores; None if none exist.

        A checkpoint that fails to restore (truncated or missing files) is skipped for the
        one before it; once one restores, the broken newer ones are moved aside to
        `<step>.corrupt-<time>` (never deleted) and reported, so their steps can be
        written again. If none restores, nothing is moved: that is more likely a config
        that no longer matches the checkpoints than corruption of all of them.
        """
        failures: list[tuple[int, Exception]] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            # Each process reads only its own data position (and array shards), so damage
            # may show on one alone, while all must resume from the same step. The position
            # is checked by every process and agreed on *before* orbax restores anything:
            # a process failing inside orbax's restore would leave the others at its barriers.
            error = self._data_position_error(step) if data_iterator is not None else None
            if not _on_every_process(error is None):
                failures.append((step, error or RuntimeError(
                    "another process's input-pipeline position is missing or unreadable")))
                continue
            try:
                state, counters = self._restore(abstract_state, data_iterator, step)
            except CheckpointError:  # intact, but not resumable by this run: never moved
                raise
            except Exception as e:  # tensorstore/orbax raise many types for bad files
                error = e
            if not _on_every_process(error is None):
                failures.append((step, error or RuntimeError("restored here, but not by "
                                                             "another process")))
                continue
            for bad, error in failures:
                moved = self._move_aside(bad)
                log.warning(f"the checkpoint at step {bad} cannot be restored "
                            f"({brief(error)}); moved it to {moved} and resumed from step {step}")
            if failures:
                self._manager.reload()
            return step, state, counters
        if failures:
            detail = "; ".join(f"step {s}: {brief(e)}" for s, e in failures)
            raise CheckpointError(
                f"no checkpoint in {self.directory} can be restored ({detail}). If the config "
                "changed since they were written, use a new workdir; if they are damaged, "
                "move them away to start over")
        return None

    def _data_position_error(self, step: int) -> Exception | None:
        """Why this process's saved input-pipeline position cannot be read, or None."""
        self._check_process_count(step)
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        try:
            files.read_json(files.join(self.directory, str(step), "data", name))
        except (OSError, ValueError) as e:
            return e
        return None

    def _check_process_count(self, step: int) -> None:
        """grain saves one iterator state per process (`process_<i>-of-<n>.json`), so only
        the same number of processes can resume it; say so instead of grain's own error."""
        data = files.join(self.directory, str(step), "data")
        written = {int(m.group(1)) for name in files.listdir(data)
                   if (m := re.fullmatch(r"process_\d+-of-(\d+)\.json", name))}
        if written and jax.process_count() not in written:
            n = max(written)
            raise CheckpointError(
                f"the checkpoint at step {step} in {self.directory} was written by {n} "
                f"process{'es' * (n > 1)} and this run has {jax.process_count()}: each process "
                f"saved its own input-pipeline position, so resume with {n} "
                f"process{'es' * (n > 1)} (--num_processes), or use a new workdir")

    def _move_aside(self, step: int) -> str:
        target = files.join(self.directory, f"{step}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_index() == 0:  # in a bucket: copied, then deleted (files.move_tree)
            files.move_tree(files.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
        return target

    def reached_preemption(self, step: int) -> bool:
        """orbax's multi-host preemption sync point (see `faults.Preemption`)."""
        return self._manager.reached_preemption(step)

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _on_every_process(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def brief(error: Exception) -> str:
    """First line of an error, capped: tensorstore errors run to pages of spec."""
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:200]}"
