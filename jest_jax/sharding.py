"""Device mesh, shardings, and host-local → global arrays.

One code path for every device count: a one-device CPU run uses the same
`Mesh` + `NamedSharding` machinery as a pod slice.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from orbax.checkpoint import multihost

from jest_jax.fields import ConfigError, Section

# A Cloud TPU VM shows its chips as /dev/accel* (v2-v4) or /dev/vfio/* (v5e and later);
# GKE also sets these variables. jax then finds the slice's workers by itself (from the
# VM's metadata server or the variables).
_TPU_VM_ENV = ("TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "CLOUD_TPU_TASK_ID")
_TPU_DEVICE_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*")


def on_tpu_vm() -> bool:
    """True on a Cloud TPU VM (or a GKE TPU node), from its environment or device files."""
    return (any(os.environ.get(k) for k in _TPU_VM_ENV)
            or any(glob.glob(pattern) for pattern in _TPU_DEVICE_FILES))


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Join a multi-process run before any device is used; True if one was joined.

    With `coordinator_address` ("host:port" of process 0), `num_processes` and
    `process_id` given, every process calls this with its own id (GPU hosts, CPU
    tests). Without them, a Cloud TPU VM is detected from its environment and
    `jax.distributed.initialize()` discovers the slice's workers itself; anywhere
    else this is a single-process run and nothing happens.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("multi-process runs need all of coordinator_address, "
                             f"num_processes and process_id; got {explicit}")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id={process_id} must be in [0, {num_processes})")
        # CPU devices of different processes talk through gloo (no-op for GPU/TPU).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        # gloo builds its communication context at the first collective and gives a
        # late peer only 30 s (not configurable). Build it now, while the processes
        # have just met at the coordinator, not at the first train step, which a
        # loaded machine may reach tens of seconds apart.
        sync_processes("jest_jax: joined")
        multihost_utils.sync_global_devices("jest_jax: gloo context")
        _watch_for_failures()
        return True
    if on_tpu_vm():
        jax.distributed.initialize()
        _watch_for_failures()
        return True
    return False


# Failures on a pod (docs/reliability.md §6). An error that one process alone meets (a bad
# record, its own unwritable mount, its own unreadable checkpoint files) would leave the
# others waiting in a barrier or a device collective until a timeout; a collective with a
# dead peer may even hang for good on TPU. So the failing process publishes its message on
# the coordination service's key-value store, and every process runs a watchdog thread that
# polls that key and ends its process with the message. The key is written once (the first
# failure wins), and only on an error: a normal end or a preemption never sets it.
_FAILED_KEY = "jest_jax/failed"
_SEEN_PREFIX = "jest_jax/failure_seen/"
_POLL_S = 1.0
# How long a failing run's processes wait for each other to show the message before they
# exit (process 0, which hosts the key-value store, leaves last).
_FAREWELL_S = 30.0


class _FailureWatch:
    """The watchdog of one process of a multi-process run (see above)."""

    def __init__(self, client: Any, index: int, count: int):
        self.client, self.index, self.count = client, index, count
        self.stop_event = threading.Event()
        self.ending = threading.Lock()  # held by whichever thread ends the process
        self.thread = threading.Thread(target=self._poll, name="jest_jax failure watch",
                                       daemon=True)

    def _published(self) -> str | None:
        try:
            return self.client.key_value_try_get(_FAILED_KEY)
        except Exception:  # NOT_FOUND: no failure; or the client is gone (shutting down)
            return None

    def _poll(self) -> None:
        while not self.stop_event.wait(_POLL_S):
            published = self._published()
            if published is not None and not published.startswith(f"{self.index}\n"):
                self._end(published)

    def fail(self, message: str, detail: str = "") -> NoReturn:
        """Publish `message` as this process's failure (unless another process's came
        first, which is then reported instead) and end every process with it."""
        try:
            self.client.key_value_set(_FAILED_KEY, f"{self.index}\n{message}")
            published = f"{self.index}\n{message}"
        except Exception:  # ALREADY_EXISTS: another process failed first
            published = self._published() or f"{self.index}\n{message}"
        self._end(published, detail)

    def _end(self, published: str, detail: str = "") -> NoReturn:
        if not self.ending.acquire(blocking=False):  # the other thread is ending it
            threading.Event().wait()
        origin, _, message = published.partition("\n")
        if int(origin) == self.index:
            # A traceback only here: another process's error is a consequence (a
            # collective whose peer left), and would bury the cause.
            print(f"{detail}{message}", file=sys.stderr)
        else:  # the failing process's own message, so every log names the cause
            print(f"process {origin} failed: {message}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            self.client.key_value_set(f"{_SEEN_PREFIX}{self.index}", "1")
            if self.index == 0:
                # The store's host leaves last: a process whose coordination service
                # disappears aborts (a fatal error in jax's client), maybe before it read
                # the message.
                deadline = time.monotonic() + _FAREWELL_S
                while (len(self.client.key_value_dir_get(_SEEN_PREFIX)) < self.count
                       and time.monotonic() < deadline):
                    time.sleep(0.2)
                time.sleep(1.0)  # their os._exit follows their key within microseconds
            else:
                # Leave once process 0 has shown the message: a peer that vanishes may be
                # reported to it by the coordination service as a fatal error first.
                self.client.blocking_key_value_get(f"{_SEEN_PREFIX}0",
                                                   int(_FAREWELL_S * 1000))
        except Exception:  # the store's host is gone, or the wait ran out
            pass
        # Not sys.exit: the main thread may be blocked in a collective, and jax's exit
        # handler would wait at the shutdown barrier for peers that will not come.
        os._exit(1)


_watch: _FailureWatch | None = None


def _watch_for_failures() -> None:
    global _watch
    from jax._src import distributed  # the client of the coordination service

    if jax.process_count() > 1 and distributed.global_state.client is not None:
        _watch = _FailureWatch(distributed.global_state.client, jax.process_index(),
                               jax.process_count())
        _watch.thread.start()


def multi_process() -> bool:
    """True in a multi-process run, where a failure must end every process."""
    return _watch is not None


def stop_failure_watch() -> None:
    """The run ended normally (or was preempted): no failure will be published any more."""
    if _watch is not None:
        _watch.stop_event.set()
        _watch.thread.join()


def fail_processes(message: str, detail: str = "") -> NoReturn:
    """End this run with `message` (on stderr, after `detail`, e.g. a traceback; exit
    status 1). In a multi-process run every process ends with it, each naming this
    process, however far it had got; the first process to fail names the cause for all."""
    if _watch is None:
        sys.exit(f"{detail}{message}")
    _watch.fail(message, detail)


def sync_processes(name: str, timeout_s: int = 3600) -> None:
    """Wait until every process has reached the barrier `name` (unique per run).

    The barrier lives on the coordination service, not on the devices, so it has its
    own generous timeout: a process that compiles or restores more slowly than the
    others (a loaded host) is waited for instead of failing a device collective.
    No-op with one process.
    """
    if jax.process_count() > 1:
        multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)


def mesh_shape(axes: Sequence[str], shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Resolve one -1 entry to "the rest of the devices"; check the product."""
    if len(axes) != len(shape):
        raise ValueError(f"config.mesh.axes={tuple(axes)} and config.mesh.shape={tuple(shape)} "
                         "must have the same length")
    if list(shape).count(-1) > 1:
        raise ValueError(f"config.mesh.shape={tuple(shape)} may contain at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if known <= 0 or num_devices % known:
        raise ValueError(f"config.mesh.shape={tuple(shape)} does not fit {num_devices} devices")
    resolved = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(resolved) != num_devices:
        raise ValueError(f"config.mesh.shape={tuple(shape)} uses {math.prod(resolved)} devices, "
                         f"but {num_devices} are available")
    return resolved


def make_mesh(axes: Sequence[str], shape: Sequence[int]) -> Mesh:
    """A mesh over all devices with named `axes` (one `shape` entry may be -1)."""
    devices = jax.devices()
    resolved = mesh_shape(axes, shape, len(devices))
    return Mesh(np.asarray(devices).reshape(resolved), tuple(axes))


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """`config.mesh`: named device axes and the rules that place parameters on them."""

    axes: tuple[str, ...]
    shape: tuple[int, ...]
    rules: tuple[Any, ...]

    @staticmethod
    def defaults() -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        c.axes = ("data",)           # named mesh axes; batches are split over all of them
        c.shape = (-1,)              # -1: all remaining devices
        # How parameters and optimizer moments are placed: (regex, spec) pairs; the first
        # regex that re.search-es a leaf's path ("params/img/.../kernel",
        # "opt_state/.../mu/img/...") decides. spec: "replicate" | "fsdp" (largest dim
        # divisible by the axis "fsdp", split over it) | "fsdp:<axis>" | a tuple
        # PartitionSpec such as (None, "fsdp"). Unmatched: replicated. FSDP:
        # axes=("data", "fsdp"), shape=(-1, 8), rules=((".*", "fsdp"),).
        c.rules = ((".*", "replicate"),)
        return c

    @classmethod
    def from_config(cls, section: Section) -> MeshSpec:
        axes, shape, rules = section.get("axes"), section.get("shape"), section.get("rules")
        section.check(isinstance(axes, tuple | list) and len(axes) > 0
                      and len(set(axes)) == len(axes)
                      and all(isinstance(a, str) and a for a in axes), "axes", axes,
                      "must be a non-empty list of distinct axis names (strings)")
        section.check(isinstance(shape, tuple | list) and len(shape) == len(axes)
                      and all(isinstance(s, int) and not isinstance(s, bool) and (s == -1 or s > 0)
                              for s in shape)
                      and list(shape).count(-1) <= 1, "shape", shape,
                      f"must give one size per axis of {tuple(axes)} (positive, or -1 once for "
                      "'the rest')")
        section.check(isinstance(rules, tuple | list), "rules", rules,
                      "must be a list of (regex, spec) pairs")
        for i, rule in enumerate(rules):
            try:
                parse_rule(rule, axes)
            except ValueError as e:
                raise ConfigError(f"config.{section.field('rules')}[{i}]={rule!r} is invalid: "
                                  f"{e}") from None
        return cls(tuple(axes), tuple(shape), tuple(rules))

    def check(self, num_devices: int) -> None:
        """ConfigError unless the mesh fits `num_devices`."""
        try:
            mesh_shape(self.axes, self.shape, num_devices)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def build(self) -> Mesh:
        return make_mesh(self.axes, self.shape)

    def shardings(self, tree: Any, mesh: Mesh) -> Any:
        """`tree_shardings` by these rules; a rule that does not fit a leaf of `tree` is a
        ConfigError (only the model's shapes show it, so not at validation)."""
        try:
            return tree_shardings(tree, mesh, self.rules)
        except RuleError as e:
            raise ConfigError(f"config.mesh.rules: {e}") from None


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (example) dimension split over every mesh axis."""
    return NamedSharding(mesh, P(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh."""
    return NamedSharding(mesh, P())


def path_name(path: Sequence[Any]) -> str:
    """A pytree key path as "params/img/encoder/block0/mlp/kernel" (what rules match)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey (optax states), SequenceKey
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def parse_rule(rule: Any, mesh_axes: Sequence[str]) -> tuple[str, Any]:
    """`(regex, spec)` → `(regex, "replicate" | ("fsdp", axis) | PartitionSpec)`.

    spec is "replicate", "fsdp" (over the mesh axis named "fsdp"), "fsdp:<axis>", or an
    explicit partition spec as a tuple with one entry per array dimension (None, an axis
    name, or a tuple of axis names). ValueError names the rule if it is malformed.
    """
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
        raise ValueError(f"sharding rule {rule!r} must be a (regex, spec) pair")
    pattern, spec = rule
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"sharding rule {rule!r}: bad regex ({e})") from None
    if spec == "replicate":
        return pattern, spec
    if isinstance(spec, str) and (spec == "fsdp" or spec.startswith("fsdp:")):
        axis = spec.partition(":")[2] or "fsdp"
        if axis not in mesh_axes:
            raise ValueError(f"sharding rule {rule!r} shards over mesh axis {axis!r}, which is "
                             f"not one of the mesh axes {tuple(mesh_axes)}")
        return pattern, ("fsdp", axis)
    if isinstance(spec, (tuple, list)):
        for entry in spec:
            names = entry if isinstance(entry, (tuple, list)) else (entry,)
            if not all(n is None or n in mesh_axes for n in names):
                raise ValueError(f"sharding rule {rule!r}: {entry!r} is not None or an axis "
                                 f"of the mesh {tuple(mesh_axes)}")
        return pattern, P(*(tuple(e) if isinstance(e, list) else e for e in spec))
    raise ValueError(f"sharding rule {rule!r}: spec must be 'replicate', 'fsdp', "
                     "'fsdp:<axis>' or a tuple partition spec")


def _fsdp_spec(shape: tuple[int, ...], axis: str, size: int) -> P:
    """Split the largest dimension that `size` divides over `axis`; replicate if none does
    (scalars, t', β, odd-sized biases): they are tiny, and padding would cost more."""
    dims = sorted((d for d in range(len(shape)) if shape[d] % size == 0 and shape[d] >= size),
                  key=lambda d: -shape[d])
    if not dims:
        return P()
    spec = [None] * len(shape)
    spec[dims[0]] = axis
    return P(*spec)


class RuleError(ValueError):
    """A sharding rule that does not fit an array of the model (found at set-up)."""


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[Any]) -> Any:
    """A `NamedSharding` per leaf of `tree` (arrays or ShapeDtypeStructs) from regex rules.

    Each leaf's `path_name` is matched with `re.search` against the
    rules in order; the first match decides, and leaves no rule matches are replicated.
    Optimizer moments live under paths that end in their parameter's path, so one rule
    such as `(".*", "fsdp")` shards parameters and their Adam moments alike.
    """
    parsed = [parse_rule(r, mesh.axis_names) for r in rules]

    def one(path, leaf) -> NamedSharding:
        name = path_name(path)
        shape = tuple(getattr(leaf, "shape", ()))
        match = next(((p, s) for p, s in parsed if re.search(p, name)), None)
        if match is None:
            return NamedSharding(mesh, P())
        pattern, spec = match
        if spec == "replicate":
            return NamedSharding(mesh, P())
        if isinstance(spec, tuple) and spec and spec[0] == "fsdp":
            return NamedSharding(mesh, _fsdp_spec(shape, spec[1], mesh.shape[spec[1]]))
        if len(spec) > len(shape):
            raise RuleError(f"sharding rule {pattern!r}: spec {spec} has more entries than "
                             f"{name} has dimensions {shape}")
        for dim, entry in zip(shape, spec, strict=False):  # trailing dims: unsplit
            names = entry if isinstance(entry, tuple) else (entry,)
            size = math.prod(mesh.shape[n] for n in names if n is not None)
            if dim % size:
                raise RuleError(f"sharding rule {pattern!r}: {name} {shape} cannot be split "
                                 f"by {spec} ({dim} is not divisible by {size})")
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, tree)


def rows_sharding(mesh: Mesh) -> NamedSharding:
    """A matrix split by rows over every mesh axis (the dense N×N score matrix)."""
    return NamedSharding(mesh, P(mesh.axis_names, None))


def placed(tree: Any, mesh: Mesh) -> Any:
    """The sharding of each leaf: its own for placed `jax.Array`s (or sharded
    ShapeDtypeStructs), replicated for host values such as NumPy scalars."""
    return jax.tree.map(lambda x: x.sharding if isinstance(getattr(x, "sharding", None),
                                                           NamedSharding)
                        else replicated(mesh), tree)


def from_host(tree: Any, abstract: Any) -> Any:
    """Host (NumPy) arrays, the same on every process, placed as `abstract`'s sharded
    ShapeDtypeStructs say (each device takes its own slice)."""
    return jax.tree.map(
        lambda a, x: jax.make_array_from_callback(a.shape, a.sharding,
                                                  lambda index: np.asarray(x[index], a.dtype)),
        abstract, tree)


def to_global(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's slice of a batch → global `jax.Array`s sharded over the mesh."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}


def to_host(tree: Any) -> Any:
    """Fetch (possibly multi-host) arrays as NumPy on every process."""
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)
