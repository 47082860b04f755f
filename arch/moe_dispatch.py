"""Moving tokens to their experts and back: the two fast MoE execution paths.

Routing (arch/moe.py) gives every token `t` a list of `K` (expert, weight) pairs:
`experts [N, K]` and `weights [N, K]`. One (token, slot) pair is an *assignment*; there
are `N * K` of them. This file runs the experts on their assignments without ever
forming a dense `[tokens, experts, d]` tensor:

  dropless  (MegaBlocks, Gale et al. 2022): sort the assignments by expert, run each
            expert on its contiguous group with a grouped matmul
            (`pallas_kernels.grouped_matmul.gmm`, `jax.lax.ragged_dot`'s semantics; the
            impl is `model.moe.gmm_impl`), un-sort, and sum the K outputs of a token
            weighted by the router. No token is ever dropped; the work is exactly
            N*K expert-token products.
  capacity  (GShard, Lepikhin et al. 2020; Switch, Fedus et al. 2021): each expert
            has a fixed buffer of C slots, `C = ceil(capacity_factor * N * K / E)`;
            assignments are scattered into an `[E, C, D]` buffer, the experts run as
            one batched matmul, and results are gathered back. Assignments beyond an
            expert's capacity are dropped (they contribute 0). Static shapes: what
            TPUs and expert parallelism (all_to_all of fixed-size buffers) want.

Both are built from separately callable pieces (`sort_by_expert`, `expert_ffn_grouped`,
`capacity_slots`, `expert_ffn_buffered`, `combine`) so that expert parallelism
(sharding/expert.py) can put an `all_to_all` between dispatch and expert compute.

    import jax, jax.numpy as jnp
    from arch.moe_dispatch import ExpertWeights, dropless_moe
    E, D, F, N, K = 4, 8, 16, 10, 2
    ks = jax.random.split(jax.random.key(0), 5)
    w = ExpertWeights(jax.random.normal(ks[0], (E, D, F)), jax.random.normal(ks[1], (E, D, F)),
                      jax.random.normal(ks[2], (E, F, D)))
    x = jax.random.normal(ks[3], (N, D))
    experts = jax.random.randint(ks[4], (N, K), 0, E)    # (distinct per token in real use)
    y = dropless_moe(x, experts, jnp.full((N, K), 0.5), w, jax.nn.silu)   # [N, D]
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from arch.precision import expert_dot, grouped_dot


class ExpertWeights(NamedTuple):
    """Stacked expert weights. `w_gate` is None for non-gated activations."""
    w_gate: jax.Array | None  # [E, D, F]
    w_up: jax.Array           # [E, D, F]
    w_down: jax.Array         # [E, F, D]


# ----------------------------------------------------------------------------- experts
def expert_ffn_grouped(x_sorted, group_sizes, w: ExpertWeights, act: Callable, *,
                       gmm_impl: str = "auto", precision: str = "bf16"):
    """Each expert's MLP on its contiguous rows: rows [start_e, start_e + group_sizes[e]).

    Args:
      x_sorted: [M, D] rows grouped by expert (expert 0 first). Rows past
        sum(group_sizes) are left out of every group and come back as 0.
      group_sizes: [E] int32 rows per expert.
      w: stacked weights, cast to x's dtype.
      act: activation; gated (w.w_gate given) computes act(x W_gate) * (x W_up).
      gmm_impl: the grouped matmul's impl (pallas_kernels.grouped_matmul: "auto" is the
        platform's Pallas kernel, ragged_dot on CPU).
      precision: model.matmul_precision of the three matmuls (arch/precision.py grouped_dot).
    Returns:
      [M, D] in x's dtype.
    """
    dt = x_sorted.dtype
    if w.w_gate is not None:
        # Gate and up projections as one grouped matmul over [W_gate | W_up]: the same
        # columns, so the same numbers, from one pass over the rows.
        f = w.w_up.shape[-1]
        w_in = jnp.concatenate([w.w_gate, w.w_up], axis=-1).astype(dt)   # [E, D, 2F]
        gate_up = grouped_dot(x_sorted, w_in, group_sizes, precision, impl=gmm_impl)  # [M, 2F]
        h = act(gate_up[:, :f]) * gate_up[:, f:]                         # [M, F]
    else:
        h = act(grouped_dot(x_sorted, w.w_up, group_sizes, precision, impl=gmm_impl))  # [M, F]
    return grouped_dot(h, w.w_down, group_sizes, precision, impl=gmm_impl)  # [M, D]


def expert_ffn_buffered(buf, w: ExpertWeights, act: Callable, *, precision: str = "bf16"):
    """Each expert's MLP on its own fixed-size buffer: buf [E, C, D] -> [E, C, D]
    (`precision`: model.matmul_precision, arch/precision.py expert_dot)."""
    h = expert_dot(buf, w.w_up, precision)
    if w.w_gate is not None:
        h = act(expert_dot(buf, w.w_gate, precision)) * h
    else:
        h = act(h)
    return expert_dot(h, w.w_down, precision)


def combine(y_assign, weights):
    """Sum each token's K expert outputs weighted by the router: [N, K, D], [N, K] -> [N, D].

    Accumulated in f32 (weights are f32), returned in y_assign's dtype.
    """
    y = jnp.einsum("nkd,nk->nd", y_assign.astype(jnp.float32), weights.astype(jnp.float32))
    return y.astype(y_assign.dtype)


# ----------------------------------------------------------------------------- dropless
@jax.custom_vjp
def permute_rows(x, perm, inverse):
    """x[perm] for a permutation `perm` of x's rows whose inverse is `inverse`.

    The gradient is the inverse gather, g[inverse]. Autodiff of x[perm] would give a
    scatter-add instead (XLA cannot know the indices are distinct), which ran as two
    8.4 ms atomic scatters per step of the small DeepSeek-V3 on an H200, 9% of its step.
    """
    return x[perm]


def _permute_rows_fwd(x, perm, inverse):
    return x[perm], (perm, inverse)


def _permute_rows_bwd(res, g):
    _, inverse = res
    return g[inverse], None, None


permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def sort_by_expert(experts, num_experts: int):
    """Order of the N*K assignments grouped by expert, and the group sizes.

    Args:
      experts: [N, K] int expert index per (token, slot).
    Returns:
      order: [N*K] indices into the flattened (token-major) assignments, stably sorted
        by expert, so within an expert tokens keep their order. `order // K` is the token.
      group_sizes: [E] int32 assignments per expert.
    """
    flat = experts.reshape(-1)  # [N*K], index n*K + k
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.zeros((num_experts,), jnp.int32).at[flat].add(1)
    return order, group_sizes


def dropless_moe(x, experts, weights, w: ExpertWeights, act: Callable, *,
                 gmm_impl: str = "auto", precision: str = "bf16"):
    """Dropless MoE: sort by expert, grouped matmuls, un-sort, weighted sum.

    Args:
      x: [N, D] tokens.
      experts: [N, K] int32 chosen experts; weights: [N, K] combine weights.
      gmm_impl, precision: the grouped matmuls' impl and precision (`expert_ffn_grouped`).
    Returns:
      [N, D] = sum_k weights[n, k] * FFN_{experts[n, k]}(x[n]).
    """
    n, k = experts.shape
    order, group_sizes = sort_by_expert(experts, w.w_up.shape[0])
    inverse = jnp.argsort(order)            # argsort of a permutation is its inverse
    # Token n's K copies (token-major; the repeat's gradient sums them), grouped by expert.
    x_sorted = permute_rows(jnp.repeat(x, k, axis=0), order, inverse)   # [N*K, D]
    y_sorted = expert_ffn_grouped(x_sorted, group_sizes, w, act, gmm_impl=gmm_impl,
                                  precision=precision)                  # [N*K, D]
    # Un-sort: assignment order[i] gets row i.
    y_assign = permute_rows(y_sorted, inverse, order)            # [N*K, D] token-major
    return combine(y_assign.reshape(n, k, -1), weights)          # [N, D]


# ----------------------------------------------------------------------------- capacity
def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """C = ceil(capacity_factor * N * K / E), at least 1 and at most N.

    No expert can receive more than N assignments (a token picks distinct experts), so
    clipping at N changes nothing but the buffer size.
    """
    c = math.ceil(capacity_factor * num_tokens * top_k / num_experts)
    return max(1, min(c, num_tokens))


def capacity_slots(experts, num_experts: int, capacity: int, valid=None):
    """Buffer slot of every assignment, in GShard/Switch priority order.

    Priority is slot-major, then token order: all first choices (k=0) of tokens
    0..N-1 claim capacity before any second choice (k=1), and so on. So a token's
    top choice is dropped only if its expert is full of earlier tokens' top choices.

    Args:
      experts: [N, K] int expert per assignment.
      capacity: C slots per expert.
      valid: optional [N] bool; invalid (padding) tokens take no capacity and are dropped.
    Returns:
      slot: [N, K] int32 flat index e*C + position into an [E*C] buffer, or E*C
        (out of bounds) for a dropped assignment.
      keep: [N, K] bool, assignment got a slot.
    """
    n, k = experts.shape
    e_prio = experts.T.reshape(-1)                           # [K*N] slot-major priority order
    if valid is not None:
        # Padding sorts after every real expert (sentinel E) so it claims no position.
        e_prio = jnp.where(jnp.tile(valid, k), e_prio, num_experts)
    order = jnp.argsort(e_prio, stable=True)                 # grouped by expert, priority kept
    sizes = jnp.zeros((num_experts + 1,), jnp.int32).at[e_prio].add(1)
    starts = jnp.cumsum(sizes) - sizes                       # [E+1] first sorted row per expert
    e_sorted = e_prio[order]
    pos_sorted = jnp.arange(n * k, dtype=jnp.int32) - starts[e_sorted]  # rank within expert
    pos = jnp.zeros((n * k,), jnp.int32).at[order].set(pos_sorted)      # back to priority order
    keep = (pos < capacity) & (e_prio < num_experts)
    slot = jnp.where(keep, e_prio * capacity + pos, num_experts * capacity)
    return slot.reshape(k, n).T, keep.reshape(k, n).T         # [N, K] each


def capacity_moe(x, experts, weights, w: ExpertWeights, act: Callable, *,
                 capacity: int, valid=None, precision: str = "bf16"):
    """Capacity-limited MoE with fixed [E, C, D] buffers (scatter in, batched FFN, gather out).

    Args:
      x: [N, D]; experts, weights: [N, K]; capacity: C; valid: optional [N] bool.
      precision: model.matmul_precision of the expert matmuls (`expert_ffn_buffered`).
    Returns:
      y: [N, D], dropped assignments contribute 0.
      keep: [N, K] bool, which assignments were computed.
    """
    n, k = experts.shape
    e, d = w.w_up.shape[0], x.shape[-1]
    slot, keep = capacity_slots(experts, e, capacity, valid)
    # Scatter: each kept assignment copies its token into its slot; slot E*C is dropped.
    buf = jnp.zeros((e * capacity, d), x.dtype)
    buf = buf.at[slot.reshape(-1)].add(jnp.repeat(x, k, axis=0), mode="drop")  # [E*C, D]
    out = expert_ffn_buffered(buf.reshape(e, capacity, d), w, act, precision=precision)  # [E, C, D]
    # Gather: dropped assignments read the fill value 0.
    y_assign = out.reshape(e * capacity, d).at[slot].get(mode="fill", fill_value=0)  # [N, K, D]
    return combine(y_assign, weights), keep
