"""How the trainer places work on devices: the mesh and rules of `sharding/`, and batches.

    mesh, rules = setup(cfg)                       # sharding.make_mesh + rules_for_mesh
    with sharding.activate(mesh, rules):           # trace and run the steps in here
        batch = device_batch(host_batch, mesh, rules)

The mesh axes of size > 1 pick the strategy (`sharding.rules_for_mesh`): data parallel,
FSDP, tensor, expert and sequence parallelism. With `mesh.sequence > 1` the host batch
is put in the striped layout first, so ring attention balances causal work; positions
travel with the tokens, and the mean loss does not depend on the order.
"""
from __future__ import annotations

import math

import jax

import sharding
from sharding import sequence as sequence_parallel
from sharding.mesh import axis_size

SEQUENCE_LAYOUT = "striped"


def setup(cfg, devices=None):
    """(mesh, rules) for `cfg.mesh`, checked against the model (heads, experts).

    A mesh with every axis given (no -1) may use fewer devices than there are: the
    first ones (`mesh.data=1` trains on one device of eight).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = dict(cfg.mesh)
    if -1 not in sizes.values():
        wanted = math.prod(v for v in sizes.values() if isinstance(v, int) and v > 0)
        if 0 < wanted < len(devices):
            devices = devices[:wanted]
    mesh = sharding.make_mesh(cfg.mesh, devices)
    rules = sharding.rules_for_mesh(mesh)
    sharding.check_model_config(cfg.model, mesh, rules)
    return mesh, rules


def check_parallel_config(cfg, devices=None) -> None:
    """ValueError naming the field when the mesh cannot split the model or the batch."""
    mesh, rules = setup(cfg, devices)
    micro = cfg.data.batch_size // cfg.train.grad_accum
    sharding.batch_spec((micro, cfg.data.seq_len), mesh, rules)  # raises if it does not divide


def device_batch(batch: dict, mesh, rules) -> dict:
    """A host numpy batch -> global arrays on the mesh (striped first when sequence-parallel)."""
    n = axis_size(mesh, "sequence")
    if n > 1:
        batch = sequence_parallel.batch_to_layout(batch, n, SEQUENCE_LAYOUT)
    return sharding.shard_batch(batch, mesh, rules)
