"""The device mesh of a launch: CFG groups × ring × Ulysses, built from `SystemConfig`.

Axes, slowest to fastest varying over the device list:
- "cfg": the two CFG branches (conditional / unconditional) on separate device groups (size 1 or 2);
- "ring": K/V blocks are passed around this axis (ppermute), so it may span slower links;
- "ulysses": all-to-all between tokens and heads, the heaviest traffic, so its devices are neighbours.

The token sequence is split over ("ring", "ulysses") together: device (c, r, u) holds the tokens of chunk
r·U + u. After Ulysses' all-to-all, a device holds the contiguous block r of L/R tokens that ring attention
needs. Axes are `Auto` (GSPMD partitions what runs outside `shard_map`).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sdjax.config import ConfigError, SystemConfig

AXES = ("cfg", "ring", "ulysses")
SEQ = ("ring", "ulysses")  # the token axis is split over both


def make_mesh(system: SystemConfig, devices=None) -> Mesh:
    """The mesh of `system` over `devices` (default: every visible device, of all processes).

    `cfg_parallel × ring × ulysses` must equal the number of devices: a clear `ConfigError` otherwise.
    """
    devices = list(jax.devices() if devices is None else devices)
    cfg, ring, ulysses = system.cfg_parallel, system.ring, system.ulysses
    n = cfg * ring * ulysses
    if n != len(devices):
        kind = devices[0].platform if devices else "no"
        raise ConfigError(
            f"parallel layout cfg_parallel={cfg} × ring={ring} × ulysses={ulysses} = {n} devices, but {len(devices)} "
            f"{kind} device(s) are visible: the product must equal the device count (restrict devices with "
            f"CUDA_VISIBLE_DEVICES, or change --cfg-parallel/--ulysses/--ring)")
    return Mesh(np.asarray(devices, dtype=object).reshape(cfg, ring, ulysses), AXES)


def mesh_for(system: SystemConfig | None, devices=None) -> Mesh | None:
    """`make_mesh`, or None for one device (system None, or the 1×1×1 layout: run on the default device)."""
    if system is None or system.num_devices == 1:
        return None
    return make_mesh(system, devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_replicated(x, mesh: Mesh | None):
    """An ordinary host/device array as a global array replicated over the mesh (works across processes)."""
    if mesh is None:
        return jax.numpy.asarray(x)
    if isinstance(x, jax.Array) and x.sharding.device_set == set(mesh.devices.flat):
        return x
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, replicated(mesh), lambda idx: x[idx])
