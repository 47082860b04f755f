"""Logical axis names -> mesh axes: the one table, its presets, and `constrain`.

Layers name logical axes only (`embed`, `heads`, `mlp`, `expert`, ... on every
parameter: arch/common.py). This file decides where each name lives on the mesh
(sharding/mesh.py), as MaxText's `logical_axis_rules` and Flax's
`nnx.with_partitioning` do. A preset is a set of strategies:

    dp        data parallel: parameters replicated, batch over `data`
    fsdp      ZeRO-3 (Rajbhandari et al. 2020): every parameter split over `fsdp` on its
              `embed` dim (or, lacking one, its largest divisible dim); batch over
              (data, fsdp). XLA all-gathers weights before use and reduce-scatters grads.
    tp        Megatron (Shoeybi et al. 2019): heads / kv_heads / mlp / vocab over `tensor`
              (column-parallel in-projections, row-parallel out-projections)
    ep        expert parallelism (GShard, Lepikhin et al. 2020): the `expert` dim over
              `expert`; outside MoE layers the expert axis carries distinct tokens
    sequence  activations' `seq` dim over `sequence` (context parallelism)

written "fsdp_tp", "fsdp+tp+ep", "fsdp_ep+sequence", ... (`_` and `+` both separate).
Parameters and activations have separate tables: a parameter's `embed` dim is split
over fsdp, an activation's `embed` dim is not (its batch dim already is).

A dim whose size the mesh axes do not divide stays replicated (e.g. kv_heads=8 on
tensor=16), except for `heads` and `expert`, whose uneven split is a config error.

    >>> from sharding.mesh import make_mesh
    >>> from sharding.rules import make_rules, logical_to_spec
    >>> mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    >>> rules = make_rules("fsdp_tp")
    >>> logical_to_spec(("embed", "heads", "head_dim"), (64, 4, 16), mesh, rules)
    PartitionSpec('fsdp', 'tensor', None)
    >>> logical_to_spec(("batch", "seq", "embed"), (8, 32, 64), mesh, rules, kind="activations")
    PartitionSpec(('data', 'fsdp'), None, None)
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import re
from typing import Iterator, Sequence

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sharding.mesh import MESH_AXES, axis_size

STRATEGIES = ("dp", "fsdp", "tp", "ep", "sequence")
PRESETS = ("dp", "fsdp", "fsdp_tp", "fsdp_ep", "fsdp_tp_ep")  # + "+sequence" on any
# The mesh axis each strategy brings into use (`data` is always in use).
_STRATEGY_AXIS = {"dp": "data", "fsdp": "fsdp", "tp": "tensor", "ep": "expert", "sequence": "sequence"}
# Logical names whose uneven split is an error, not a silent replication.
REQUIRED_SPLITS = frozenset({"heads", "expert"})


@dataclasses.dataclass(frozen=True)
class Rules:
    """Logical name -> tuple of mesh axes, for parameters and for activations.

    Frozen and hashable, so it can be a static argument of `jax.jit`.
    """
    name: str
    params: tuple[tuple[str, tuple[str, ...]], ...]
    activations: tuple[tuple[str, tuple[str, ...]], ...]
    fsdp_fallback: bool = False       # ZeRO-3: split parameters lacking an fsdp dim anyway
    required: frozenset = REQUIRED_SPLITS

    def table(self, kind: str) -> dict[str, tuple[str, ...]]:
        if kind not in ("params", "activations"):
            raise ValueError(f"kind={kind!r} must be one of ('params', 'activations')")
        return dict(self.params if kind == "params" else self.activations)

    @property
    def mesh_axes(self) -> tuple[str, ...]:
        """Mesh axes this preset puts to use (others must have size 1)."""
        used = {a for _, axes in self.params + self.activations for a in axes}
        return tuple(a for a in MESH_AXES if a in used)


def parse_preset(preset: str) -> tuple[str, ...]:
    """'fsdp_tp+sequence' -> ('fsdp', 'tp', 'sequence'); ValueError for unknown parts."""
    parts = tuple(p for p in re.split(r"[_+]", preset) if p)
    parts = tuple("sequence" if p == "sp" else p for p in parts)
    bad = [p for p in parts if p not in STRATEGIES]
    if bad or not parts:
        raise ValueError(f"sharding preset {preset!r}: unknown parts {bad}; use one of {PRESETS}, "
                         f"optionally with '+sequence', or strategies {STRATEGIES} joined by '+'")
    return parts


def make_rules(preset: str = "fsdp") -> Rules:
    """The rules of a preset (see module docstring)."""
    s = set(parse_preset(preset))
    params: dict[str, tuple[str, ...]] = {}
    acts: dict[str, tuple[str, ...]] = {}
    # Every axis that splits the batch; `expert` carries distinct tokens outside MoE layers.
    acts["batch"] = ("data",) + (("fsdp",) if "fsdp" in s else ()) + (("expert",) if "ep" in s else ())
    if "fsdp" in s:
        params["embed"] = ("fsdp",)
    if "tp" in s:
        for name in ("heads", "kv_heads", "mlp", "vocab"):
            params[name] = acts[name] = ("tensor",)
    if "ep" in s:
        params["expert"] = acts["expert"] = ("expert",)
    if "sequence" in s:
        acts["seq"] = ("sequence",)
    name = "+".join(p for p in STRATEGIES if p in s)
    return Rules(name, tuple(sorted(params.items())), tuple(sorted(acts.items())),
                 fsdp_fallback="fsdp" in s)


def rules_for_mesh(mesh) -> Rules:
    """The preset a mesh asks for: every axis of size > 1 brings in its strategy.

    {data: 8} -> dp; {fsdp: 8} -> fsdp; {fsdp: 4, tensor: 2} -> fsdp+tp; ...
    """
    strategies = [s for s, a in _STRATEGY_AXIS.items() if s == "dp" or axis_size(mesh, a) > 1]
    return make_rules("+".join(strategies))


def check_rules(mesh, rules: Rules) -> None:
    """ValueError when the mesh has an axis > 1 that the preset leaves unused (wasted devices)."""
    idle = [a for a in MESH_AXES if axis_size(mesh, a) > 1 and a not in rules.mesh_axes and a != "data"]
    if idle:
        shown = ", ".join(f"mesh.{a}={axis_size(mesh, a)}" for a in idle)
        raise ValueError(f"{shown} but sharding preset {rules.name!r} uses only {rules.mesh_axes}; "
                         f"pick a preset that uses them (one of {PRESETS}) or set them to 1")


def check_model_config(cfg_model, mesh, rules: Rules) -> None:
    """The splits a model config must allow, checked before anything is built.

    Raises:
      ValueError: naming the model field and the mesh axis, e.g. heads not divisible
        by the tensor axis, or experts by the expert axis.
    """
    check_rules(mesh, rules)
    p = rules.table("params")
    checks = [("num_heads", cfg_model.num_heads, "heads")]
    if cfg_model.get("moe") is not None:
        checks.append(("moe.num_experts", cfg_model.moe.num_experts, "expert"))
    for field, value, name in checks:
        axes = [a for a in p.get(name, ()) if axis_size(mesh, a) > 1]
        n = math.prod(axis_size(mesh, a) for a in axes)
        if value % n:
            shown = " x ".join(f"mesh.{a}={axis_size(mesh, a)}" for a in axes)
            raise ValueError(f"model.{field}={value} must be divisible by {shown} "
                             f"(sharding preset {rules.name!r} splits '{name}' over {tuple(axes)})")


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh, rules: Rules,
                    *, kind: str = "params", where: str = "") -> P:
    """PartitionSpec of an array with these logical axes and this shape on `mesh`.

    Mesh axes of size 1 are skipped; a mesh axis is used once per array (first dim
    wins); a dim that its mesh axes do not divide keeps the longest prefix of them
    that does (usually none: replicated), unless its name is a required split.
    With `rules.fsdp_fallback` (ZeRO-3), a parameter that got no fsdp dim from its names
    is split over fsdp on its largest divisible dim (never the scanned `layers` dim).

    Args:
      logical_axes: one name (or None) per dim.
      shape: the array's shape.
      kind: "params" or "activations": which table of `rules` to read.
      where: the array's path, for error messages.
    Raises:
      ValueError: rank mismatch, or a required split (heads, expert) that does not divide.
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"{where or 'array'}: logical axes {tuple(logical_axes)} and shape "
                         f"{tuple(shape)} differ in rank")
    table = rules.table(kind)
    used: set[str] = set()
    spec: list = []
    for name, size in zip(logical_axes, shape, strict=True):
        axes = [a for a in table.get(name, ()) if axis_size(mesh, a) > 1 and a not in used]
        n = math.prod(axis_size(mesh, a) for a in axes)
        if size % n and name in rules.required:
            shown = " x ".join(f"mesh.{a}={axis_size(mesh, a)}" for a in axes)
            raise ValueError(f"{where or 'array'}: its '{name}' dim of size {size} must be divisible "
                             f"by {shown}")
        while axes and size % math.prod(axis_size(mesh, a) for a in axes):
            axes.pop()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    f = axis_size(mesh, "fsdp")
    if kind == "params" and rules.fsdp_fallback and f > 1 and "fsdp" not in used:
        free = [d for d, (name, size) in enumerate(zip(logical_axes, shape, strict=True))
                if spec[d] is None and name != "layers" and size % f == 0]
        if free:
            spec[max(free, key=lambda d: shape[d])] = "fsdp"
    return P(*spec)


def named_sharding(logical_axes, shape, mesh, rules: Rules, *, kind: str = "params") -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh, rules, kind=kind))


# ----------------------------------------------------------------------------- activations
_ACTIVE_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("rules", default=None)


@contextlib.contextmanager
def activate(mesh, rules: Rules | None = None) -> Iterator[Rules]:
    """Make `mesh` (`jax.set_mesh`) and `rules` current: `constrain` and expert parallelism
    read them while tracing. Trace (call the jitted step for the first time) inside it.

        with sharding.activate(mesh, rules):
            metrics = train_step(model, optimizer, batch)
    """
    rules = rules_for_mesh(mesh) if rules is None else rules
    check_rules(mesh, rules)
    token = _ACTIVE_RULES.set(rules)
    try:
        with jax.set_mesh(mesh):
            yield rules
    finally:
        _ACTIVE_RULES.reset(token)


def active_rules() -> Rules | None:
    """The rules set by `activate`, or None."""
    return _ACTIVE_RULES.get()


def active_mesh():
    """The mesh set by `activate` / `jax.set_mesh` (abstract inside jit), or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Pin an activation's sharding by logical names, e.g. `constrain(h, ("batch", "seq", "mlp"))`.

    A no-op outside `activate(...)` (single device, or no rules), so layers may call it
    unconditionally. Under a mesh it is `jax.lax.with_sharding_constraint` with the
    activation table of the active rules.
    """
    rules, mesh = active_rules(), active_mesh()
    if rules is None or mesh is None:
        return x
    spec = logical_to_spec(logical_axes, x.shape, mesh, rules, kind="activations")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
