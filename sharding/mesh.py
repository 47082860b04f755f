"""The device mesh: five named axes, sized from `cfg.mesh`, for any device count.

Axes (DESIGN.md), outermost first, so that axes which talk most (tensor, expert,
sequence) sit on neighbouring devices of one host:

    data      pure data parallelism: batch split, parameters replicated
    fsdp      ZeRO-3 / FSDP (Rajbhandari et al. 2020): batch split, parameters,
              gradients and optimizer state split, weights all-gathered per layer
    tensor    Megatron tensor parallelism (Shoeybi et al. 2019): heads / mlp / vocab split
    expert    expert parallelism (GShard, Lepikhin et al. 2020): experts split,
              tokens exchanged with all_to_all
    sequence  context parallelism: activations split along the sequence

`cfg.mesh` gives each axis a size; one axis may be -1 ("all devices left"), omitted
axes are 1. The product must equal the number of devices.

    >>> from sharding.mesh import make_mesh
    >>> mesh = make_mesh({"data": -1, "fsdp": 2})     # 8 devices -> data=4, fsdp=2
    >>> dict(mesh.shape)
    {'data': 4, 'fsdp': 2, 'tensor': 1, 'expert': 1, 'sequence': 1}
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor", "expert", "sequence")


def mesh_shape(cfg_mesh: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """`cfg.mesh` -> {axis: size} over all MESH_AXES, with the -1 axis resolved.

    Raises:
      ValueError: naming the field, for an unknown axis, a size that is not a positive
        int or -1, two -1 axes, or sizes whose product is not `num_devices`.
    """
    sizes = dict(cfg_mesh)
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh has unknown axes {unknown}; the allowed axes are {MESH_AXES}")
    for axis in MESH_AXES:
        v = sizes.setdefault(axis, 1)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not (v == -1 or v >= 1):
            raise ValueError(f"mesh.{axis}={v!r} must be a positive int or -1 (all devices left)")
    rest = [a for a in MESH_AXES if sizes[a] == -1]
    if len(rest) > 1:
        raise ValueError(f"mesh axes {rest} are all -1; at most one axis may be -1")
    fixed = math.prod(sizes[a] for a in MESH_AXES if sizes[a] != -1)
    if rest:
        if num_devices % fixed:
            raise ValueError(f"mesh.{rest[0]}=-1: the other axes multiply to {fixed}, which does "
                             f"not divide the {num_devices} devices")
        sizes[rest[0]] = num_devices // fixed
    elif fixed != num_devices:
        shown = ", ".join(f"{a}={sizes[a]}" for a in MESH_AXES)
        raise ValueError(f"mesh axes ({shown}) multiply to {fixed}, but there are {num_devices} "
                         "devices; make the product match or set one axis to -1")
    return {a: int(sizes[a]) for a in MESH_AXES}


def make_mesh(cfg_mesh: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` with axes MESH_AXES sized from `cfg_mesh`, over `devices` (default: all).

    Axes are `AxisType.Auto`: the compiler propagates shardings from the ones we set on
    parameters, batches and `sharding.rules.constrain` points.
    """
    devices = jax.devices() if devices is None else list(devices)
    sizes = mesh_shape(cfg_mesh, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, devices=devices,
                         axis_types=(AxisType.Auto,) * len(MESH_AXES))


def axis_size(mesh, axis: str) -> int:
    """Size of a mesh axis, 1 when the mesh lacks it (works for abstract meshes too)."""
    return int(dict(mesh.shape).get(axis, 1))
