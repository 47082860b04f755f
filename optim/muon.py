"""Muon and Moonlight as optax chains on top of `optax.contrib.scale_by_muon`.

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers") keeps a momentum of
the gradient of each weight matrix and replaces it by its nearest semi-orthogonal
matrix with a quintic Newton-Schulz iteration (5 steps, coefficients
(3.4445, -4.7750, 2.0315)) before the step:

    M_t = beta M_{t-1} + (1 - beta) G_t              (optax: bias-corrected, Adam style)
    U_t = NS5(beta M_t + (1 - beta) G_t)             (Nesterov; NS5(M) ~ U V^T of M = U S V^T)
    W_t = W_{t-1} - lr (s(A, B) U_t + wd W_{t-1})    (decoupled weight decay)

The Newton-Schulz iteration, momentum and Nesterov come from `optax.contrib`
(`scale_by_muon`); this file adds the per-shape update scale s(A, B) for a matrix with A
input (reduction) and B output rows:

    muon       s = sqrt(max(1, B / A))        (Jordan's width transfer)
    moonlight  s = 0.2 * sqrt(max(A, B))      (Liu et al. 2025, "Muon is Scalable for LLM
                                               Training": matches AdamW's update RMS ~0.2,
                                               so AdamW's lr and weight decay carry over)

An orthogonal [A, B] matrix has RMS 1/sqrt(max(A, B)), so Moonlight's update RMS is 0.2·lr.

Stacked weights ([layers, ...], [expert, ...]) and multi-axis kernels are handled by
`MuonDimensionNumbers` from optim/labels.py: each matrix of the stack is orthogonalised
on its own (a vmap inside optax). Fused weights (MLA's wkv_a = [W_DKV | W_KR], wkv_b =
[W_UK | W_UV]) can be cut into their logical matrices (`split_fused`, optional).

Sharded parameters (FSDP). Newton-Schulz is a chain of matmuls X X^T on the whole
matrix. Under `jax.jit` with sharded inputs, XLA's SPMD partitioner computes those
matmuls on the sharded operands and inserts the collectives itself (all-gathers of the
sharded dimension, or partial sums with all-reduces), so the result equals the
unsharded update. With jax's explicit sharding (the default axis type of
`jax.make_mesh` since jax 0.9) a product like [A@fsdp, B] x [B, A@fsdp] is a sharding
type error instead, so `auto_sharded` runs the Muon update under
`jax.sharding.auto_axes` (XLA chooses the collectives as above) and returns updates and
state with the shardings they came in with; tests/optim/test_muon.py checks that it
equals the unsharded update on 8 devices. Cost: per step, about 5 x 3 matmuls of [min(A,B)]^2 x max(A,B) per matrix
(~2% of a training step's FLOPs for a model with 4096-wide layers at 1M tokens per
batch) plus communication of the order of one all-gather of each matrix per NS step.
Moonlight's distributed Muon (gather each matrix once onto one device, orthogonalise
there, scatter back) is the better layout at scale; it is not built here.

Example:

    import jax.numpy as jnp, optax
    from optim.labels import label_params
    from optim.muon import muon_chain
    params = {"w": jnp.ones((4, 8))}
    specs = label_params(params)
    tx = muon_chain(lambda tree: specs, learning_rate=0.02, scale="moonlight", weight_decay=0.1)
    state = tx.init(params)
"""
from __future__ import annotations

import itertools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from optax.contrib import MuonDimensionNumbers, scale_by_muon

from optim.labels import is_state_leaf, map_params, path_key

SCALES = ("muon", "moonlight")
MOONLIGHT_RMS = 0.2


def _axes(x) -> tuple[int, ...]:
    return (x,) if isinstance(x, int) else tuple(x)


def shape_scale(shape, dims: MuonDimensionNumbers, scale: str, rms: float = MOONLIGHT_RMS) -> float:
    """Update scale s(A, B) of a Muon matrix (see the module docstring)."""
    a = math.prod(shape[i] for i in _axes(dims.reduction_axis))
    b = math.prod(shape[i] for i in _axes(dims.output_axis))
    if scale == "moonlight":
        return rms * math.sqrt(max(a, b))
    if scale == "muon":
        return math.sqrt(max(1.0, b / a))
    raise ValueError(f"scale={scale!r} must be one of {SCALES}")


def scale_by_shape(get_specs: Callable, scale: str, rms: float = MOONLIGHT_RMS
                   ) -> optax.GradientTransformation:
    """Multiply each Muon update by s(A, B) of its matrix shape (stateless)."""
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r} must be one of {SCALES}")

    def update_fn(updates, state, params=None):
        del params
        specs = get_specs(updates)
        out = map_params(lambda p, u: u * shape_scale(u.shape, specs[p].dims, scale, rms), updates)
        return out, state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def dims_fn(get_specs: Callable) -> Callable:
    """The `weight_dimension_numbers` callable for optax: a tree of MuonDimensionNumbers."""
    def fn(tree):
        specs = get_specs(tree)
        return map_params(lambda p, _: specs[p].dims, tree)
    return fn


def muon_chain(get_specs: Callable, *, learning_rate, scale: str = "moonlight",
               beta: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
               weight_decay: float = 0.0, rms: float = MOONLIGHT_RMS,
               mu_dtype=None) -> optax.GradientTransformation:
    """Muon on the parameters it is given (all must be labelled Muon in `get_specs(tree)`).

    Args:
      get_specs: tree -> {path: ParamSpec} (optim/labels.py); only `.dims` and `.decay`
        are read here.
      learning_rate: float or optax schedule.
      scale: "muon" (Jordan) or "moonlight" (Liu et al.), see module docstring.
      beta: momentum coefficient.
      nesterov: Nesterov momentum.
      ns_steps: Newton-Schulz iterations.
      weight_decay: decoupled weight decay; the step subtracts lr * wd * W.
      rms: Moonlight's target update RMS (0.2).
      mu_dtype: dtype of the momentum buffer (None: the parameter dtype).
    """
    def decay_mask(tree):
        specs = get_specs(tree)
        return map_params(lambda p, _: specs[p].decay, tree)

    return auto_sharded(split_fused(optax.chain(
        scale_by_muon(beta=beta, nesterov=nesterov, ns_steps=ns_steps, mu_dtype=mu_dtype,
                      weight_dimension_numbers=dims_fn(get_specs)),
        scale_by_shape(get_specs, scale, rms),
        optax.add_decayed_weights(weight_decay, decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    ), get_specs))


def split_fused(inner: optax.GradientTransformation, get_specs: Callable
                ) -> optax.GradientTransformation:
    """Run `inner` on fused weights cut into their logical matrices (ParamSpec.split).

    A fused leaf becomes a tuple of pieces before `inner` (so momentum, Newton-Schulz and
    the shape scale act per piece) and the pieces are concatenated back after it.
    """
    def split(tree):
        specs = get_specs(tree)

        def cut(p, x):
            if specs[p].split is None:
                return x
            axis, sizes = specs[p].split
            v = x.get_value() if isinstance(x, nnx.Variable) else x
            return tuple(jnp.split(v, list(itertools.accumulate(sizes[:-1])), axis=axis))
        return map_params(cut, tree)

    def join(pieces, like):
        specs = get_specs(like)

        def glue(path, _, sub):
            if isinstance(sub, optax.MaskedNode) or specs[path_key(path)].split is None:
                return sub
            return jnp.concatenate(sub, axis=specs[path_key(path)].split[0])
        return jax.tree_util.tree_map_with_path(glue, like, pieces, is_leaf=is_state_leaf)

    def init_fn(params):
        return inner.init(split(params))

    def update_fn(updates, state, params=None):
        out, state = inner.update(split(updates), state, None if params is None else split(params))
        return join(out, updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def _explicit_sharding(x):
    """x's NamedSharding if some mesh axis of it is Explicit, else None."""
    sh = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sh, "mesh", None)
    if mesh is None or not mesh.axis_names:
        return None
    explicit = jax.sharding.AxisType.Explicit
    return sh if any(t == explicit for t in mesh.axis_types) else None


def auto_sharded(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner`, with its update run in XLA's automatic sharding mode for explicit-sharded inputs.

    Updates and state leave with the shardings they arrived with; unsharded or
    auto-sharded inputs go straight to `inner`.
    """
    def update_fn(updates, state, params=None):
        leaves = jax.tree.leaves((updates, state))
        shardings = [_explicit_sharding(x) for x in leaves]
        if not any(s is not None for s in shardings):
            return inner.update(updates, state, params)
        mesh = next(s.mesh for s in shardings if s is not None)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        out_sharding = jax.tree.map(lambda x: _explicit_sharding(x) or replicated, (updates, state))
        return jax.sharding.auto_axes(lambda u, s, p: inner.update(u, s, p),
                                      out_sharding=out_sharding)(updates, state, params)

    return optax.GradientTransformation(inner.init, update_fn)


def update_rms(updates) -> jax.Array:
    """Root mean square over all entries of a tree of updates (a diagnostic)."""
    leaves = jax.tree.leaves(updates)
    sq = sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)
    return jnp.sqrt(sq / sum(x.size for x in leaves))
