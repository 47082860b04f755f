"""Model, optimizer state and batches placed on the mesh by their logical axis names.

Every `nnx.Param` carries its logical axes in `out_sharding` metadata (arch/common.py);
optimizer moments copy that metadata (`nnx.Optimizer`), so one function gives the
sharding of any state tree. Large models are created directly sharded: the init runs
under `jax.jit(..., out_shardings=...)`, so each device only ever computes its shard
(Flax NNX "Scale up on multiple devices" guide; MaxText does the same).

    >>> import sharding
    >>> from configs import llama3
    >>> cfg = llama3.get_config("tiny")
    >>> mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    >>> rules = sharding.make_rules("fsdp")
    >>> model = sharding.create_sharded_model(cfg.model, mesh, rules, seed=0)
    >>> batch = sharding.shard_batch({"tokens": np.zeros((8, 128), np.int32)}, mesh, rules)
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sharding.rules import Rules, check_model_config, logical_to_spec, rules_for_mesh


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def variable_spec(var: nnx.Variable, mesh, rules: Rules, where: str = "") -> P:
    """PartitionSpec of one variable from its `out_sharding` logical axes (none: replicated)."""
    axes = var.get_metadata().get("out_sharding")
    if not axes:
        return P()
    return logical_to_spec(tuple(axes), var.shape, mesh, rules, kind="params", where=where)


def state_shardings(tree, mesh, rules: Rules | None = None):
    """A NamedSharding for every array of `tree` (an nnx State, or any pytree of Variables).

    Variables keep their structure (their value becomes the sharding), as
    `nnx.get_named_sharding` does, so the result serves as `jax.jit` in/out_shardings.
    Arrays that are not Variables (step counters, RNG keys) are replicated.
    """
    rules = rules_for_mesh(mesh) if rules is None else rules

    def one(path, x):
        if _is_variable(x):
            where = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
            return x.replace(NamedSharding(mesh, variable_spec(x, mesh, rules, where)))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_variable)


def shard_state(*nodes, mesh, rules: Rules | None = None) -> None:
    """Place the state of nnx modules / optimizers on the mesh, in place.

    For models built on the host (small ones); big ones: `create_sharded`.
    """
    for node in nodes:
        state = nnx.state(node)
        nnx.update(node, jax.device_put(state, state_shardings(state, mesh, rules)))


def create_sharded(init_fn: Callable, mesh, rules: Rules | None = None):
    """Run `init_fn() -> nnx objects` (a module, an optimizer, a tuple of them) so that
    every array is born sharded: shapes from `nnx.eval_shape`, values from a jit with
    `out_shardings`. No device ever holds a whole unsharded parameter."""
    rules = rules_for_mesh(mesh) if rules is None else rules
    abstract = nnx.eval_shape(init_fn)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    with jax.set_mesh(mesh):
        state = jax.jit(lambda: nnx.state(init_fn()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def create_sharded_model(cfg_model, mesh, rules: Rules | None = None, seed: int = 0) -> nnx.Module:
    """`arch.build_model(cfg_model, seed)` created sharded (the same values, split over `mesh`).

    Checks the config against the mesh first (heads % tensor, experts % expert).
    """
    from arch import build_model  # here: arch.moe imports sharding.expert

    rules = rules_for_mesh(mesh) if rules is None else rules
    check_model_config(cfg_model, mesh, rules)
    return create_sharded(lambda: build_model(cfg_model, seed), mesh, rules)


# ----------------------------------------------------------------------------- batches
def batch_spec(shape, mesh, rules: Rules | None = None) -> P:
    """Spec of a [batch, seq, ...] input array: batch over the batch axes, seq over `sequence`.

    Raises:
      ValueError: if the batch (or sequence) size does not divide over its mesh axes.
    """
    rules = rules_for_mesh(mesh) if rules is None else rules
    names = ("batch", "seq")[: len(shape)] + (None,) * max(0, len(shape) - 2)
    acts = rules.table("activations")
    for dim, name in enumerate(names[:2]):
        axes = [a for a in acts.get(name, ()) if dict(mesh.shape).get(a, 1) > 1]
        n = math.prod(dict(mesh.shape)[a] for a in axes)
        if shape[dim] % n:
            shown = " x ".join(f"mesh.{a}={dict(mesh.shape)[a]}" for a in axes)
            raise ValueError(f"input {name} size {shape[dim]} must be divisible by {shown}")
    return logical_to_spec(names, shape, mesh, rules, kind="activations")


def batch_sharding(shape, mesh, rules: Rules | None = None) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(shape, mesh, rules))


def shard_batch(batch: dict, mesh, rules: Rules | None = None) -> dict:
    """Host numpy batch (this process's rows) -> global jax arrays split over the batch axes."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        global_shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
        out[k] = jax.make_array_from_process_local_data(batch_sharding(global_shape, mesh, rules), v)
    return out


# ----------------------------------------------------------------------------- accounting
def bytes_per_device(tree) -> int:
    """Largest per-device byte count of the arrays (or ShapeDtypeStructs) of `tree`, from
    their shardings: sum over arrays of shard size, maximised over devices."""
    per_device: dict = {}
    for x in jax.tree.leaves(tree):
        itemsize = np.dtype(x.dtype).itemsize
        sharding = x.sharding
        for device, index in sharding.devices_indices_map(x.shape).items():
            shard = [len(range(*s.indices(n))) for s, n in zip(index, x.shape, strict=True)]
            per_device[device] = per_device.get(device, 0) + math.prod(shard) * itemsize
    return max(per_device.values(), default=0)
