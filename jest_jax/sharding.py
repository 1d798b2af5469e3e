"""Device mesh, shardings, and host-local → global arrays.

One code path for every device count: a one-device CPU run uses the same
`Mesh` + `NamedSharding` machinery as a pod slice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


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


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (example) dimension split over every mesh axis."""
    return NamedSharding(mesh, P(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh."""
    return NamedSharding(mesh, P())


def to_global(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's slice of a batch → global `jax.Array`s sharded over the mesh."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}


def to_host(tree: Any) -> Any:
    """Fetch (possibly multi-host) arrays as NumPy on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)
