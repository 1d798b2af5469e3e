"""orbax checkpoints holding the train state next to the global data position."""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jest_jax import files, log
from jest_jax.fields import Section
from jest_jax.sharding import path_name


class CheckpointError(RuntimeError):
    """No checkpoint of a workdir that has some can be restored."""


class ChecksumError(ValueError):
    """A restored array's checksum differs from the one saved with it: the files were
    readable but their content changed."""


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


def read_params(workdir: str, abstract_params: Any, step: int | None = None
                ) -> tuple[Any, int]:
    """(params, step): only the params of the run in `workdir` at `step` (its latest
    checkpoint if None), shaped and placed like `abstract_params`, read-only (nothing
    there is moved or removed); FileNotFoundError when it has no checkpoint."""
    checkpointer = Checkpointer(workdir)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}")
        return checkpointer.restore_params(abstract_params, step), step
    finally:
        checkpointer.close()


def _committed(directory: str, name: str) -> bool:
    """Whether the step directory `name` is a finished save. Locally orbax writes into
    `<step>.orbax-checkpoint-tmp-*` and renames, so a `<step>` is finished; a bucket has
    no rename, and orbax writes `<step>/` directly and `commit_success.txt` last."""
    return not files.is_url(directory) or files.exists(
        files.join(directory, name, "commit_success.txt"))


class Checkpointer:
    """`workdir/checkpoints/<step>/{state,checksums,position,counters}`; all processes take
    part (orbax).

    `position` is the data position, a small JSON item written once (by process 0), not
    one per process, so any number of processes can resume it (`data.pipeline.Stream`);
    checkpoints written before it hold grain's per-process states in `data/` instead.
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

    def save(self, step: int, state: Any, position: dict[str, Any] | None = None,
             counters: dict[str, int] | None = None) -> None:
        """Save asynchronously (arrays are copied to host first, so donation is safe),
        with a checksum of each array of `state` (`checksums`), checked on restore."""
        items = {"state": ocp.args.StandardSave(state),
                 "checksums": ocp.args.JsonSave(checksums(state))}
        if position is not None:
            items["position"] = ocp.args.JsonSave(position)
        if counters is not None:
            items["counters"] = ocp.args.JsonSave(counters)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, abstract_state: Any, step: int | None = None) -> Any:
        """Restore `state`, shaped and sharded like `abstract_state` (orbax re-shards it
        onto any mesh). Defaults to the latest step."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return self._restore(abstract_state, step)[0]

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
        self._verify(step, restored)
        return restored["params"]

    def _verify(self, step: int, restored: Any) -> None:
        """ChecksumError unless every restored array matches the checksum saved with it
        (checkpoints written before checksums existed have none, and pass)."""
        reader = ocp.Checkpointer(ocp.JsonCheckpointHandler())
        try:  # orbax reads the item, so any path orbax can read (gs:// too) works
            saved = reader.restore(files.join(self.directory, str(step), "checksums"))
        except FileNotFoundError:
            return
        finally:
            reader.close()
        verify_checksums(restored, saved, f"the checkpoint at step {step}")

    def _restore(self, abstract_state: Any, step: int) -> tuple[Any, dict[str, int]]:
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        has_counters = files.is_dir(files.join(self.directory, str(step), "counters"))
        if has_counters:  # absent in checkpoints written before counters existed
            items["counters"] = ocp.args.JsonRestore()
        out = self._manager.restore(step, args=ocp.args.Composite(**items))
        self._verify(step, out["state"])
        return out["state"], (dict(out["counters"]) if has_counters else {})

    def restore_latest_good(self, abstract_state: Any,
                            check_position: Callable[[dict[str, Any]], str | None] | None = None
                            ) -> tuple[int, Any, dict[str, int], dict[str, Any] | None] | None:
        """(step, state, counters, data position) of the newest checkpoint that restores;
        None if none exist.

        With `check_position`, each checkpoint's data position is read first, and
        `check_position(position)` says why this run cannot continue it (another batch
        size, another dataset, ...): that stops the run with a `CheckpointError` naming
        the checkpoint, and nothing is moved. Without it, no position is read (None).

        A checkpoint that fails to restore (truncated or missing files) is skipped for the
        one before it; once one restores, the broken newer ones are moved aside to
        `<step>.corrupt-<time>` (never deleted) and reported, so their steps can be
        written again. If none restores, nothing is moved: that is more likely a config
        that no longer matches the checkpoints than corruption of all of them.
        """
        failures: list[tuple[int, Exception]] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            # Each process reads the data position (and its own array shards), and a read
            # may fail on one alone, while all must resume from the same step. The position
            # is read by every process and agreed on *before* orbax restores anything: a
            # process failing inside orbax's restore would leave the others at its barriers.
            position, error = None, None
            if check_position is not None:
                position, error = self._read_position(step)
            if not _on_every_process(error is None):
                failures.append((step, error or RuntimeError(
                    "another process could not read the input-pipeline position")))
                continue
            why = check_position(position) if position is not None else None
            if why:  # every process read the same file, so all stop here together
                raise CheckpointError(
                    f"the checkpoint at step {step} in {self.directory} cannot continue "
                    f"this run's data order: it was written with {why}. Resume with the "
                    "values it was written with, or use a new workdir")
            try:
                state, counters = self._restore(abstract_state, step)
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
            return step, state, counters, position
        if failures:
            detail = "; ".join(f"step {s}: {brief(e)}" for s, e in failures)
            raise CheckpointError(
                f"no checkpoint in {self.directory} can be restored ({detail}). If the config "
                "changed since they were written, use a new workdir; if they are damaged, "
                "move them away to start over")
        return None

    def _read_position(self, step: int) -> tuple[dict[str, Any] | None, Exception | None]:
        """(the data position saved at `step`, None), or (None, why it cannot be read).

        Read with orbax's JSON handler directly, not through the manager: its restore
        ends at a barrier, where one process failing would leave the others waiting.
        """
        path = files.join(self.directory, str(step))
        try:
            if files.is_dir(files.join(path, "position")):
                return dict(ocp.JsonCheckpointHandler().restore(
                    epath.Path(path) / "position")), None
            return _legacy_position(files.join(path, "data")), None
        except Exception as e:  # a missing, truncated or unreadable file
            return None, e

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


def _legacy_position(data: str) -> dict[str, Any]:
    """grain's iterator state in a checkpoint written before `position` existed.

    Each of the n processes wrote `process_<i>-of-<n>.json` with `{"next_index": k}`, k
    its batches drawn, which is the global batch count on every process: any one file is
    the whole position, so a run of any process count reads its own file if it has one
    and process 0's otherwise.
    """
    names = files.listdir(data)
    counts = {int(m.group(1)) for name in names
              if (m := re.fullmatch(r"process_\d+-of-(\d+)\.json", name))}
    if not counts:
        raise FileNotFoundError(f"no input-pipeline position in {data}")
    n = max(counts)
    i = jax.process_index() if jax.process_index() < n else 0
    return dict(files.read_json(files.join(data, f"process_{i}-of-{n}.json")))


def _on_every_process(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def brief(error: Exception) -> str:
    """First line of an error, capped: tensorstore errors run to pages of spec."""
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:200]}"


# Checksums (docs/reliability.md §3). orbax and tensorstore check no content, so a flipped
# bit in a readable file would restore silently. Each array gets two sums of its bits,
# computed on the devices as one program over the global arrays: integer sums are exact
# in any order, so the result is the same whatever the sharding, the device count or the
# number of processes that save or restore (an elastic resume), and no host reads a
# whole array. The weighted sum uses odd weights, so a change of any one element (a
# flipped bit or byte) always changes it; the plain sum adds a second, independent check.
CHECKSUM_ALGORITHM = "u32 sum, odd-weighted u32 sum of each element's bits"


def _bits(x: jax.Array) -> jax.Array:
    """Each element's bits as uint32 (8-, 16- and 32-bit types; booleans as 0/1)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(x.dtype.itemsize)
    if unsigned is None:
        raise TypeError(f"no checksum for {x.dtype} arrays (8-, 16- and 32-bit types only)")
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _sums(x: jax.Array) -> jax.Array:
    """[sum of bits, sum of bits * (2 * flat index + 1)], both modulo 2**32."""
    bits = _bits(x)
    index, stride = jnp.zeros(x.shape, jnp.uint32), 1
    for dim in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, dim) * jnp.uint32(stride)
        stride = stride * x.shape[dim] % 2**32
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32),
                      jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)])


@functools.cache
def _sums_program(mesh: Any) -> Any:
    """The sums of a list of arrays as one [n, 2] uint32 array, replicated so that every
    process holds the whole (tiny) result; compiled once per tree of shapes."""
    out = None if mesh is None else NamedSharding(mesh, P())
    return jax.jit(lambda xs: jnp.stack([_sums(x) for x in xs]) if xs
                   else jnp.zeros((0, 2), jnp.uint32), out_shardings=out)


def checksums(tree: Any) -> dict[str, Any]:
    """{"algorithm", "arrays": {path name: [plain, weighted]}} of every array of `tree`:
    one device program and one small fetch (at save time only, never per step)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    arrays = [x if isinstance(x, jax.Array) else jnp.asarray(x) for _, x in leaves]
    mesh = next((a.sharding.mesh for a in arrays if isinstance(a.sharding, NamedSharding)),
                None)
    host = np.asarray(jax.device_get(_sums_program(mesh)(arrays))).reshape(-1, 2)
    return {"algorithm": CHECKSUM_ALGORITHM,
            "arrays": {path_name(p): [int(a), int(b)] for (p, _), (a, b) in zip(leaves, host,
                                                                                   strict=True)}}


def verify_checksums(tree: Any, saved: dict[str, Any], what: str) -> None:
    """ChecksumError naming the arrays of `tree` whose sums differ from `saved`'s, or that
    have none there (`tree` may be a subset of what was saved: a params-only read)."""
    if saved.get("algorithm") != CHECKSUM_ALGORITHM:
        raise ChecksumError(f"{what} has checksums of an unknown kind "
                            f"({saved.get('algorithm')!r})")
    now = checksums(tree)["arrays"]
    expected = saved["arrays"]
    missing = [name for name in now if name not in expected]
    if missing:
        raise ChecksumError(f"{what} has no checksum for {len(missing)} restored array(s): "
                            f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}")
    bad = [name for name, sums in now.items() if expected[name] != sums]
    if bad:
        raise ChecksumError(f"checksum mismatch in {len(bad)} array(s) of {what}: "
                            f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}: the "
                            "files are readable but their content changed")
