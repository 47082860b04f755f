"""Expert parallelism: experts split over the `expert` mesh axis, tokens moved by all_to_all.

GShard (Lepikhin et al. 2020, arXiv:2006.16668) sec. 2.2; Switch Transformer (Fedus et
al. 2021); DeepSeek-V3 (arXiv:2412.19437) sec. 3.2. The `EP` devices of one `expert`
group each hold `E / EP` experts and their own tokens. For one MoE layer, inside
`shard_map`, every device:

  1. routes its tokens (arch/moe.py `route`, done by the caller): experts [n, K], weights [n, K]
  2. packs its assignments into one fixed-size buffer per destination device   [EP, M, D]
  3. `all_to_all` over `expert`: now holds the tokens of its own experts, from every source
  4. runs its experts (batched einsum on [E/EP, EP*C, D] buffers, or grouped matmuls)
  5. `all_to_all` back, unpacks, and sums each token's K outputs weighted by the router

Two paths, the same maths as arch/moe_dispatch.py (whose pieces they reuse):

  capacity  fixed [E, C_pair, D] send buffers. capacity_scope="global" (default) keeps
            exactly the assignments that the single-device layer keeps: each
            assignment's position in its expert's queue is global (slot-major, then
            token order, GShard/Switch priority), computed from per-shard counts
            ([S, K, E] ints, all_gather'ed), so the drops are identical; a source can
            then send up to min(C, n) tokens to one expert, which sizes its buffer.
            capacity_scope="shard" gives every token shard its own capacity ceil(C / S)
            (GShard's "groups"): buffers of exactly the expected size, and the drops of
            the single-device layer applied to each shard's tokens separately.
  dropless  no token is dropped: assignments sorted by expert, so by destination; each
            destination gets a buffer of the largest possible share, n * min(K, E/EP)
            rows (jax.lax.ragged_all_to_all would send only the real rows, but XLA:CPU
            does not implement it). The receiver sorts its rows by local expert and
            runs the grouped matmuls of arch.moe_dispatch.expert_ffn_grouped
            (pallas_kernels.grouped_matmul.gmm, impl `gmm_impl`); the padding rows
            sort last, past every group, and come back as 0.

The tensor axis, when > 1, splits each expert's hidden (`mlp`) dim (Megatron inside the
expert); the partial down-projections are summed with psum.

Hook: `dropless_moe` and `capacity_moe` below have the signatures of arch/moe_dispatch.py's
functions and fall back to them when no mesh with expert > 1 is active, so the MoE
layer uses expert parallelism by importing them from here instead:

    # arch/moe.py
    from sharding.expert import capacity_moe, dropless_moe

and running under `sharding.activate(mesh, rules)`. Example (8 CPU devices):

    >>> mesh = sharding.make_mesh({"data": 2, "expert": 4})
    >>> with sharding.activate(mesh):
    ...     y = jax.jit(lambda *a: dropless_moe(*a, jax.nn.silu))(x, experts, weights, w)
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from arch.moe_dispatch import (
    ExpertWeights,
    capacity_slots,
    combine,
    expert_ffn_buffered,
    expert_ffn_grouped,
    permute_rows,
)
from arch.moe_dispatch import capacity_moe as _capacity_moe_local
from arch.moe_dispatch import dropless_moe as _dropless_moe_local
from sharding.mesh import axis_size
from sharding.rules import active_mesh

CAPACITY_SCOPES = ("global", "shard")
TOKEN_AXES = ("data", "fsdp", "expert", "sequence")  # axes that split tokens, in mesh order
_SCOPE: contextvars.ContextVar[str] = contextvars.ContextVar("capacity_scope", default="global")


@contextlib.contextmanager
def capacity_scope(scope: str):
    """Set the capacity scope ("global" | "shard") that `capacity_moe` uses under EP."""
    if scope not in CAPACITY_SCOPES:
        raise ValueError(f"capacity_scope={scope!r} must be one of {CAPACITY_SCOPES}")
    token = _SCOPE.set(scope)
    try:
        yield
    finally:
        _SCOPE.reset(token)


def expert_mesh():
    """The active mesh if it has an `expert` axis > 1 (expert parallelism on), else None."""
    mesh = active_mesh()
    return mesh if mesh is not None and axis_size(mesh, "expert") > 1 else None


# ----------------------------------------------------------------------------- hooks
def dropless_moe(x, experts, weights, w: ExpertWeights, act: Callable, *, gmm_impl: str = "auto",
                 precision: str = "bf16"):
    """arch.moe_dispatch.dropless_moe, expert-parallel when an expert mesh is active."""
    mesh = expert_mesh()
    kw = dict(gmm_impl=gmm_impl, precision=precision)
    if mesh is None:
        return _dropless_moe_local(x, experts, weights, w, act, **kw)
    return ep_dropless_moe(x, experts, weights, w, act, mesh=mesh, **kw)


def capacity_moe(x, experts, weights, w: ExpertWeights, act: Callable, *, capacity: int, valid=None,
                 precision: str = "bf16"):
    """arch.moe_dispatch.capacity_moe, expert-parallel when an expert mesh is active."""
    mesh = expert_mesh()
    if mesh is None:
        return _capacity_moe_local(x, experts, weights, w, act, capacity=capacity, valid=valid,
                                   precision=precision)
    return ep_capacity_moe(x, experts, weights, w, act, mesh=mesh, capacity=capacity, valid=valid,
                           scope=_SCOPE.get(), precision=precision)


# ----------------------------------------------------------------------------- layout
def _layout(mesh, x, w: ExpertWeights):
    """Token axes, tensor axis and in/out specs; ValueError for splits that do not divide."""
    n = x.shape[0]
    e, f = w.w_up.shape[0], w.w_up.shape[-1]
    ep = axis_size(mesh, "expert")
    if e % ep:
        raise ValueError(f"moe.num_experts={e} must be divisible by mesh.expert={ep}")
    token_axes = tuple(a for a in TOKEN_AXES if axis_size(mesh, a) > 1)
    shards = math.prod(axis_size(mesh, a) for a in token_axes)
    if n % shards:
        raise ValueError(f"tokens (batch*seq={n}) must be divisible by the token shards "
                         f"{dict((a, axis_size(mesh, a)) for a in token_axes)} = {shards}")
    t = axis_size(mesh, "tensor")
    tensor = "tensor" if t > 1 and f % t == 0 else None
    return token_axes, shards, tensor


def _weights_and_specs(w: ExpertWeights, tensor):
    """The present weight arrays (w_gate may be None) and their shard_map specs:
    experts over `expert`, the hidden dim over `tensor` (None: replicated)."""
    arrays = tuple(a for a in w if a is not None)
    specs = (P("expert", None, tensor),) * (len(arrays) - 1) + (P("expert", tensor, None),)
    return arrays, specs


def _as_weights(arrays) -> ExpertWeights:
    return ExpertWeights(*arrays) if len(arrays) == 3 else ExpertWeights(None, *arrays)


def _shard_map(fn, mesh, args, in_specs, out_specs):
    """shard_map whose arguments first get the in_specs sharding (jax >= 0.10 demands it;
    under jit this is where XLA all-gathers FSDP-split expert weights)."""
    args = jax.tree.map(lambda a, s: jax.lax.with_sharding_constraint(a, NamedSharding(mesh, s)),
                        args, in_specs)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)(*args)


def _run_experts(fn, tensor):
    """Partial outputs of a hidden-dim (tensor) split are summed over the tensor axis."""
    def run(*args):
        y = fn(*args)
        return y if tensor is None else jax.lax.psum(y, tensor)
    return run


# ----------------------------------------------------------------------------- capacity
def ep_capacity_moe(x, experts, weights, w: ExpertWeights, act: Callable, *, mesh, capacity: int,
                    valid=None, scope: str = "global", precision: str = "bf16"):
    """Capacity-limited MoE with experts split over the mesh's `expert` axis.

    Args:
      x: [N, D] tokens (N = batch * seq, split over the token axes).
      experts, weights: [N, K] routing (distinct experts per token, as top-k gives).
      w: stacked expert weights [E, ...]; E must divide by mesh.expert.
      capacity: C, slots per expert over all N tokens (arch.moe_dispatch.expert_capacity).
      valid: optional [N] bool; padding takes no capacity.
      scope: "global" (the single-device drops) or "shard" (capacity ceil(C/S) per token shard).
      precision: model.matmul_precision of the expert matmuls (arch/precision.py).
    Returns:
      y [N, D], keep [N, K] bool (as arch.moe_dispatch.capacity_moe).
    """
    if scope not in CAPACITY_SCOPES:
        raise ValueError(f"scope={scope!r} must be one of {CAPACITY_SCOPES}")
    token_axes, shards, tensor = _layout(mesh, x, w)
    n, k = experts.shape
    e = w.w_up.shape[0]
    ep = axis_size(mesh, "expert")
    e_loc, n_loc = e // ep, n // shards
    if scope == "global":
        c_pair = min(capacity, n_loc)     # most tokens one shard can get kept at one expert
    else:
        c_pair = math.ceil(capacity / shards)
    valid = jnp.ones((n,), jnp.bool_) if valid is None else valid.astype(jnp.bool_)

    def local(x, experts, weights, valid, warrays):
        # x [n, D]; experts, weights [n, K]; valid [n]; warrays: this device's E/EP experts.
        w = _as_weights(warrays)
        if scope == "shard":
            slot, keep = capacity_slots(experts, e, c_pair, valid)           # [n, K] each
        else:
            slot, keep = _global_capacity_slots(experts, valid, e, capacity, c_pair, token_axes)
        d = x.shape[-1]
        send = jnp.zeros((e * c_pair, d), x.dtype)
        send = send.at[slot.reshape(-1)].add(jnp.repeat(x, k, axis=0), mode="drop")  # [E*Cp, D]
        send = send.reshape(ep, e_loc * c_pair, d)                      # [EP dest, E_loc*Cp, D]
        recv = jax.lax.all_to_all(send, "expert", 0, 0, tiled=True)     # [EP source, E_loc*Cp, D]
        buf = recv.reshape(ep, e_loc, c_pair, d).swapaxes(0, 1).reshape(e_loc, ep * c_pair, d)
        ffn = functools.partial(expert_ffn_buffered, precision=precision)
        out = _run_experts(ffn, tensor)(buf, w, act)                    # [E_loc, EP*Cp, D]
        out = out.reshape(e_loc, ep, c_pair, d).swapaxes(0, 1).reshape(ep, e_loc * c_pair, d)
        back = jax.lax.all_to_all(out, "expert", 0, 0, tiled=True)      # [EP, E_loc*Cp, D] = [E*Cp, D]
        y_assign = back.reshape(e * c_pair, d).at[slot].get(mode="fill", fill_value=0)  # [n, K, D]
        return combine(y_assign, weights), keep

    tok = P(token_axes)
    warrays, wspecs = _weights_and_specs(w, tensor)
    return _shard_map(local, mesh, (x, experts, weights, valid, warrays),
                      (tok, tok, tok, tok, wspecs), (tok, tok))


def _global_capacity_slots(experts, valid, num_experts: int, capacity: int, c_pair: int, token_axes):
    """Send-buffer slot and keep flag of the local assignments, with global priority.

    An assignment (token n, slot k) to expert e stands at global queue position
        sum_{k' < k} count[k', e]  +  sum_{shards s' < s} count_{s'}[k, e]  +  rank in shard,
    over all N tokens (slot-major, then token order: arch.moe_dispatch.capacity_slots),
    and is kept iff that position < capacity. Kept local assignments to e are the first
    ones in local priority order, so their local rank (< c_pair) is their buffer row.
    """
    n, k = experts.shape
    e = num_experts
    # Local priority rank of every assignment within its expert (no local dropping).
    slot_all, _ = capacity_slots(experts, e, n * k, valid)
    local_rank = slot_all - experts * (n * k)                              # [n, K] (padding: junk)
    counts = jnp.zeros((k, e), jnp.int32).at[
        jnp.broadcast_to(jnp.arange(k), (n, k)), experts].add(valid[:, None].astype(jnp.int32))  # [K, E]
    rank_in_slot = local_rank - (jnp.cumsum(counts, 0) - counts)[jnp.arange(k)[None, :], experts]
    everyone = jax.lax.all_gather(counts, token_axes)                      # [S, K, E]
    s = jax.lax.axis_index(token_axes)
    earlier_shards = jnp.sum(jnp.where((jnp.arange(everyone.shape[0]) < s)[:, None, None],
                                       everyone, 0), axis=0)               # [K, E]
    totals = everyone.sum(0)                                               # [K, E]
    earlier_slots = jnp.cumsum(totals, 0) - totals                         # [K, E]
    kk = jnp.arange(k)[None, :]
    global_pos = earlier_slots[kk, experts] + earlier_shards[kk, experts] + rank_in_slot  # [n, K]
    keep = valid[:, None] & (global_pos < capacity)
    slot = jnp.where(keep, experts * c_pair + local_rank, e * c_pair)
    return slot, keep


# ----------------------------------------------------------------------------- dropless
def ep_dropless_moe(x, experts, weights, w: ExpertWeights, act: Callable, *, mesh,
                    gmm_impl: str = "auto", precision: str = "bf16"):
    """Dropless MoE with experts split over the mesh's `expert` axis (padded all_to_all).

    Args:
      x: [N, D]; experts, weights: [N, K] (distinct experts per token); w: [E, ...] weights.
      gmm_impl, precision: the grouped matmuls' impl and precision (arch.moe_dispatch.expert_ffn_grouped).
    Returns:
      [N, D] = sum_k weights[n, k] * FFN_{experts[n, k]}(x[n]), as arch.moe_dispatch.dropless_moe.
    """
    token_axes, shards, tensor = _layout(mesh, x, w)
    n, k = experts.shape
    e = w.w_up.shape[0]
    ep = axis_size(mesh, "expert")
    e_loc, n_loc = e // ep, n // shards
    m = n_loc * min(k, e_loc)      # most assignments one shard can send to one destination

    def local(x, experts, weights, warrays):
        w = _as_weights(warrays)
        d = x.shape[-1]
        flat = experts.reshape(-1)                                        # [n*K] token-major
        order = jnp.argsort(flat, stable=True)                            # grouped by expert
        e_sorted = flat[order]
        dest = e_sorted // e_loc                                          # [n*K] destination device
        sizes = jnp.zeros((ep,), jnp.int32).at[flat // e_loc].add(1)
        starts = jnp.cumsum(sizes) - sizes
        row = dest * m + jnp.arange(flat.shape[0]) - starts[dest]          # row in the send buffer
        inverse = jnp.argsort(order)
        x_sorted = permute_rows(jnp.repeat(x, k, axis=0), order, inverse)  # [n*K, D] by expert
        send = jnp.zeros((ep * m, d), x.dtype).at[row].set(x_sorted)      # [EP*M, D]
        ids = jnp.full((ep * m,), e_loc, jnp.int32).at[row].set(e_sorted - dest * e_loc)  # E_loc = pad
        recv = jax.lax.all_to_all(send.reshape(ep, m, d), "expert", 0, 0, tiled=True).reshape(ep * m, d)
        rids = jax.lax.all_to_all(ids.reshape(ep, m), "expert", 0, 0, tiled=True).reshape(ep * m)
        # Group the received rows by local expert; padding (id E_loc) sorts last, in no group.
        order2 = jnp.argsort(rids, stable=True)
        group_sizes = jnp.zeros((e_loc,), jnp.int32).at[rids].add(1, mode="drop")
        ffn = functools.partial(expert_ffn_grouped, gmm_impl=gmm_impl, precision=precision)
        inverse2 = jnp.argsort(order2)
        out = _run_experts(ffn, tensor)(permute_rows(recv, order2, inverse2), group_sizes, w, act)
        out = permute_rows(out, inverse2, order2)                         # back to arrival order
        back = jax.lax.all_to_all(out.reshape(ep, m, d), "expert", 0, 0, tiled=True).reshape(ep * m, d)
        y_sorted = back[row]                                              # [n*K, D] expert order
        y_assign = permute_rows(y_sorted, inverse, order)                 # [n*K, D] token-major
        return combine(y_assign.reshape(-1, k, d), weights)               # [n, D]

    tok = P(token_axes)
    warrays, wspecs = _weights_and_specs(w, tensor)
    return _shard_map(local, mesh, (x, experts, weights, warrays), (tok, tok, tok, wspecs), tok)
