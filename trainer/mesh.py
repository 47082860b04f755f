"""A data-parallel mesh from `cfg.mesh`, until `sharding/` provides the full one.

The mesh has all five mesh axes of DESIGN.md (`data, fsdp, tensor, expert, sequence`),
so specs written against it keep working when `sharding.mesh` takes over; for now
every axis but `data` must be 1. Batches are split over `data` along their first
axis; parameters and optimizer state are replicated (`shard_state`; sharding/ will
replace it with logical-axis rules).

    >>> from configs.base import get_base_config
    >>> from trainer.mesh import make_mesh_from_config, shard_batch
    >>> mesh = make_mesh_from_config(get_base_config().mesh)      # data = all devices
    >>> # batch = shard_batch(numpy_batch, mesh)                  # [B, T] split over data
"""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert", "sequence")


def check_mesh_config(cfg, num_devices: int | None = None) -> dict[str, int]:
    """`cfg.mesh` -> {axis: size} with -1 resolved; ValueError naming the field otherwise."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    sizes = dict(cfg)
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh has unknown axes {unknown}; the axes are {MESH_AXES}")
    for axis in MESH_AXES:
        v = sizes.setdefault(axis, 1)
        if not isinstance(v, int) or not (v == -1 or v >= 1):
            raise ValueError(f"mesh.{axis}={v!r} must be a positive int or -1 (all devices left)")
        if axis != "data" and v != 1:
            raise ValueError(f"mesh.{axis}={v} must be 1: this trainer is data-parallel only "
                             "until sharding/ lands (use mesh.data)")
    if sizes["data"] == -1:
        sizes["data"] = num_devices
    if sizes["data"] > num_devices:
        raise ValueError(f"mesh.data={sizes['data']} exceeds the {num_devices} devices available")
    return sizes


def make_mesh_from_config(cfg, devices=None) -> Mesh:
    """A Mesh over the first `mesh.data` devices, shaped [data, 1, 1, 1, 1]."""
    devices = jax.devices() if devices is None else list(devices)
    sizes = check_mesh_config(cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return Mesh(np.asarray(devices[: sizes["data"]]).reshape(shape), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Host numpy batch (this process's rows) -> global jax arrays split over `data`."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


def state_shardings(tree, mesh: Mesh):
    """Target sharding of every array of a state tree: replicated for now."""
    return jax.tree.map(lambda _: replicated(mesh), tree)


def shard_state(*nodes, mesh: Mesh) -> None:
    """Place the state of nnx modules/optimizers on the mesh, in place (replicated)."""
    for node in nodes:
        state = nnx.state(node)
        nnx.update(node, jax.device_put(state, state_shardings(state, mesh)))
