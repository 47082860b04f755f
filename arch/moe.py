"""Mixture-of-Experts feed-forward layer: router, routed experts, shared experts, balancing.

A router scores every token against E experts; each token goes to its top K experts
and the layer output is the router-weighted sum of those experts' MLPs, plus
always-on shared experts:

    y = sum_{i in topK(t)} g_{t,i} FFN_i(x_t)  [* routed_scaling_factor]  + FFN_shared(x_t)

Papers and the options they add:
  Shazeer et al. 2017; GShard (Lepikhin et al. 2020); Switch (Fedus et al. 2021):
      softmax top-k routing, load-balance loss alpha*E*sum_i f_i*P_i, capacity factor.
  ST-MoE (Zoph et al. 2022): router z-loss mean(logsumexp(logits)^2).
  DeepSeekMoE / DeepSeek-V2 (2024): shared experts, group-limited routing.
  DeepSeek-V3 (2024, arXiv:2412.19437): sigmoid scores, top-k weights renormalised,
      routed scaling factor, group score = sum of the group's top-2 scores, and
      auxiliary-loss-free balancing: a per-expert bias added to the scores for
      *selection only*, nudged after every step by b_i += u * sign(mean_load - load_i).

How the pieces split (expert parallelism in sharding/expert.py reuses them):
  `route(logits, ...)`            -> `Routing(weights [N,K], experts [N,K], scores [N,E])`
  arch/moe_dispatch.py            -> run experts on grouped tokens: dropless / capacity
  `moe_dense_reference(...)`      -> every expert on every token, masked (the readable spec)
  `load_balance_loss`, `router_z_loss` -> the auxiliary losses
  `MoE`                           -> the nnx module tying them together
  `update_router_biases(model, aux)` -> aux-loss-free bias update for a whole model

Config: `cfg.moe` (configs/base.py `moe_defaults()`); `cfg.moe.dispatch` picks the path:
"dropless" (sort + grouped matmuls), "capacity" (fixed [E, C, D] buffers, token dropping at
`capacity_factor`), "dense" (the reference). `cfg.moe.gmm_impl` picks the dropless path's
grouped matmul (pallas_kernels/grouped_matmul: "auto" = the platform's Pallas kernel,
jax.lax.ragged_dot on CPU). Example:

    import jax.numpy as jnp
    from flax import nnx
    from configs.base import model_defaults, moe_defaults
    from arch.moe import MoE
    cfg = model_defaults(); cfg.moe = moe_defaults()
    moe = MoE(cfg, rngs=nnx.Rngs(0))
    y, aux = moe(jnp.ones((2, 5, cfg.d_model)))   # y: [2, 5, 64]; aux["moe_aux_loss"], ...
"""
from __future__ import annotations

import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from arch.common import Linear, check_choice, dtype_of, logical_param, param
from arch.mlp import MLP, activation_fn
from arch.moe_dispatch import ExpertWeights, expert_capacity
from arch.precision import check_expert_precision, expert_dot
from pallas_kernels.grouped_matmul import IMPLS as GMM_IMPLS

# Expert-parallel dispatch (all_to_all over the `expert` mesh axis) when sharding.activate()
# is in effect; otherwise these are the single-device functions of arch.moe_dispatch.
from sharding.expert import capacity_moe, dropless_moe

SCORE_FUNCS = ("softmax", "sigmoid")
DISPATCHES = ("dropless", "capacity", "dense")
AUX_LOSS_GRANULARITIES = ("batch", "sequence")


# ----------------------------------------------------------------------------- config
def validate_moe_config(m) -> None:
    """ValueError naming the `moe.<field>` and its allowed values, before any compute."""
    for field in ("num_experts", "top_k", "expert_mlp_dim", "n_group", "topk_group"):
        if not isinstance(m[field], int) or m[field] < 1:
            raise ValueError(f"moe.{field}={m[field]!r} must be a positive int")
    e, k, g, kg = m.num_experts, m.top_k, m.n_group, m.topk_group
    if k > e:
        raise ValueError(f"moe.top_k={k} must be <= moe.num_experts={e}")
    if e % g:
        raise ValueError(f"moe.n_group={g} must divide moe.num_experts={e}")
    if kg > g:
        raise ValueError(f"moe.topk_group={kg} must be <= moe.n_group={g}")
    if k > kg * (e // g):
        raise ValueError(f"moe.top_k={k} must be <= topk_group * experts per group = {kg * (e // g)}")
    check_choice("moe.score_func", m.score_func, SCORE_FUNCS)
    check_choice("moe.dispatch", m.dispatch, DISPATCHES)
    check_choice("model.moe.gmm_impl", m.get("gmm_impl", "auto"), GMM_IMPLS)
    check_choice("moe.aux_loss_granularity", m.get("aux_loss_granularity", "batch"),
                 AUX_LOSS_GRANULARITIES)
    cf = m.capacity_factor
    if m.dispatch == "capacity":
        if cf is None or not cf > 0:
            raise ValueError(f"moe.capacity_factor={cf!r} must be a number > 0 with dispatch='capacity'")
    elif cf is not None:
        raise ValueError(f"moe.capacity_factor={cf!r} applies only to moe.dispatch='capacity' "
                         f"(got dispatch={m.dispatch!r}); use None for dropless/dense")
    if m.num_shared_experts < 0:
        raise ValueError(f"moe.num_shared_experts={m.num_shared_experts} must be >= 0")
    for field in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
        if m[field] < 0:
            raise ValueError(f"moe.{field}={m[field]} must be >= 0")


# ----------------------------------------------------------------------------- routing
class Routing(NamedTuple):
    weights: jax.Array  # [N, K] f32 combine weights (renormalised, scaled)
    experts: jax.Array  # [N, K] int32 chosen experts, best first
    scores: jax.Array   # [N, E] f32 softmax or sigmoid scores (no bias), for the aux loss


def route(logits, *, top_k: int, score_func: str = "softmax", norm_topk_prob: bool = True,
          routed_scaling_factor: float = 1.0, n_group: int = 1, topk_group: int = 1,
          bias=None) -> Routing:
    """Top-k routing (the DeepSeek-V3 gate; Mixtral/Qwen/Switch are special cases).

    1. scores s = softmax(logits) or sigmoid(logits), [N, E], f32.
    2. selection scores s + bias (aux-loss-free balancing; bias [E] never enters weights).
    3. group-limited (n_group > 1): split experts into n_group contiguous groups; a
       group scores the sum of its top-2 selection scores for sigmoid (DeepSeek-V3)
       or its max for softmax (DeepSeek-V2); keep the topk_group best groups.
    4. experts = top_k of the selection scores among kept groups.
    5. weights = s at those experts, / their sum if norm_topk_prob, * routed_scaling_factor.

    Args:
      logits: [N, E] router logits (computed in f32).
    Returns:
      Routing(weights [N, K] f32, experts [N, K] int32, scores [N, E] f32).
    """
    logits = logits.astype(jnp.float32)
    n, e = logits.shape
    scores = jax.nn.softmax(logits, axis=-1) if score_func == "softmax" else jax.nn.sigmoid(logits)
    sel = scores if bias is None else scores + jax.lax.stop_gradient(bias).astype(jnp.float32)
    if n_group > 1:
        grouped = sel.reshape(n, n_group, e // n_group)              # [N, G, E/G]
        if score_func == "sigmoid":
            top2 = jax.lax.top_k(grouped, min(2, e // n_group))[0]     # [N, G, 2]
            group_score = top2.sum(-1)                                 # [N, G]
        else:
            group_score = grouped.max(-1)                              # [N, G]
        kept = jax.lax.top_k(group_score, topk_group)[1]               # [N, topk_group]
        group_mask = jax.nn.one_hot(kept, n_group, dtype=jnp.bool_).any(1)  # [N, G]
        sel = jnp.where(group_mask[:, :, None], grouped, -jnp.inf).reshape(n, e)
    # top_k is not differentiable in its indices; gradients reach the router via weights.
    _, experts = jax.lax.top_k(sel, top_k)                             # [N, K]
    weights = jnp.take_along_axis(scores, experts, axis=-1)            # [N, K]
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return Routing(weights * routed_scaling_factor, experts.astype(jnp.int32), scores)


# ----------------------------------------------------------------------------- losses
def expert_counts(experts, num_experts: int, mask=None):
    """Assignments per expert, [E] f32, counting only tokens where mask [N] is True."""
    w = jnp.ones(experts.shape, jnp.float32)
    if mask is not None:
        w = w * mask[:, None].astype(jnp.float32)
    return jnp.zeros((num_experts,), jnp.float32).at[experts].add(w)


def load_balance_loss(scores, experts, mask=None, *, top_k: int, coef: float = 1.0):
    """alpha * E * sum_i f_i * P_i over the tokens given (Switch eq. 4; GShard; DeepSeek).

    f_i = (assignments to expert i) / (K * tokens): the fraction of (token, slot)
          assignments routed to i, so sum_i f_i = 1.
    P_i = mean over tokens of s'_{t,i} = s_{t,i} / sum_j s_{t,j}: the mean normalised
          router score (a no-op for softmax; DeepSeek-V3 eq. 19 for sigmoid).
    This equals DeepSeek-V2/V3's alpha * sum_i f'_i P_i with f'_i = E/(K T) * count_i
    (eq. 18), so a perfectly balanced router gives exactly alpha. f_i is a count and
    carries no gradient; P_i carries it to the router.

    Args:
      scores: [N, E] f32; experts: [N, K]; mask: optional [N] bool (False = padding).
    Returns:
      scalar loss.
    """
    n, e = scores.shape
    m = jnp.ones((n,), jnp.float32) if mask is None else mask.astype(jnp.float32)
    tokens = jnp.maximum(m.sum(), 1.0)
    f = expert_counts(experts, e, m > 0) / (top_k * tokens)                 # [E]
    s_norm = scores / scores.sum(-1, keepdims=True)
    p = (s_norm * m[:, None]).sum(0) / tokens                               # [E]
    return coef * e * jnp.sum(f * p)


def sequence_balance_loss(scores, experts, mask, *, top_k: int, coef: float = 1.0):
    """DeepSeek-V3 complementary sequence-wise balance loss (eqs. 17-20): the loss above
    computed over each row of the batch separately, then averaged over non-empty rows.

    Args:
      scores: [B, T, E]; experts: [B, T, K]; mask: [B, T] bool.
    """
    per_row = jax.vmap(lambda s, x, m: load_balance_loss(s, x, m, top_k=top_k, coef=coef))
    losses = per_row(scores, experts, mask)                                 # [B]
    nonempty = mask.any(-1).astype(jnp.float32)
    return jnp.sum(losses * nonempty) / jnp.maximum(nonempty.sum(), 1.0)


def router_z_loss(logits, mask=None, *, coef: float = 1.0):
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): coef * mean_t logsumexp(logits_t)^2."""
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)             # [N]
    m = jnp.ones_like(lse) if mask is None else mask.astype(jnp.float32)
    return coef * jnp.sum(m * lse**2) / jnp.maximum(m.sum(), 1.0)


# ----------------------------------------------------------------------------- reference
def moe_dense_reference(x, experts, weights, w: ExpertWeights, act, *, precision: str = "bf16"):
    """The spec of the routed part: every expert on every token, masked by routing weights.

    combine[n, e] = weights[n, k] where experts[n, k] == e, else 0;
    y[n] = sum_e combine[n, e] * FFN_e(x[n]).   O(N * E) work: a reference, not a path to train.

    Args:
      x: [N, D]; experts, weights: [N, K]; w: stacked expert weights.
      precision: model.matmul_precision of the expert matmuls (arch/precision.py expert_dot:
        every expert sees all N tokens, so the rowwise scales are the fast paths').
    Returns:
      [N, D] in x's dtype.
    """
    n, e = x.shape[0], w.w_up.shape[0]
    gate = jnp.zeros((n, e), jnp.float32).at[jnp.arange(n)[:, None], experts].add(weights)  # [N, E]
    dt = x.dtype
    xe = jnp.broadcast_to(x, (e,) + x.shape)                                  # [E, N, D]
    h = expert_dot(xe, w.w_up, precision)                                     # [E, N, F]
    if w.w_gate is not None:
        h = act(expert_dot(xe, w.w_gate, precision)) * h
    else:
        h = act(h)
    y = expert_dot(h, w.w_down, precision)                                    # [E, N, D]
    return jnp.einsum("end,ne->nd", y.astype(jnp.float32), gate).astype(dt)


# ----------------------------------------------------------------------------- module
class RouterBias(nnx.Variable):
    """Aux-loss-free balancing bias [E] (DeepSeek-V3). Not an nnx.Param: no gradient,
    no optimizer state; changed only by `update_router_biases` between steps."""


class MoE(nnx.Module):
    """MoE feed-forward layer. `__call__(x [B, T, D], segment_ids=None) -> (y, aux)`.

    aux (all f32):
      moe_aux_loss      aux_loss_coef * E * sum_i f_i P_i (see `load_balance_loss`)
      moe_z_loss        z_loss_coef * mean_t logsumexp(logits_t)^2
      expert_load       [E] assignments routed to each expert (before any dropping);
                        what `update_router_biases` balances and what logs plot
      dropped_fraction  share of assignments dropped for capacity (0 unless dispatch="capacity")
    Padding tokens (segment_ids == 0) count in none of them and, with dispatch="capacity",
    take no expert capacity (their routed output is then 0). The capacity itself is
    ceil(capacity_factor * B*T * K / E) over all B*T positions of the call (static shapes).
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        m = cfg.moe
        if m is None:
            raise ValueError("model.moe=None: the MoE layer needs a moe config (configs/base.py moe_defaults())")
        validate_moe_config(m)
        self.act, gated = activation_fn(cfg.activation)
        self.num_experts, self.top_k = m.num_experts, m.top_k
        self.score_func, self.norm_topk_prob = m.score_func, m.norm_topk_prob
        self.routed_scaling_factor = float(m.routed_scaling_factor)
        self.n_group, self.topk_group = m.n_group, m.topk_group
        self.aux_loss_coef, self.z_loss_coef = float(m.aux_loss_coef), float(m.z_loss_coef)
        self.aux_loss_granularity = m.get("aux_loss_granularity", "batch")
        self.dispatch, self.capacity_factor = m.dispatch, m.capacity_factor
        self.gmm_impl = m.get("gmm_impl", "auto")  # the dropless path's grouped matmul
        self.precision = cfg.get("matmul_precision", "bf16")  # the experts' (arch/precision.py)
        check_expert_precision(self.precision)
        self.bias_update_rate = float(m.bias_update_rate)
        self.dtype = dtype_of(cfg.dtype)
        pdt = dtype_of(cfg.param_dtype)
        e, d, f, std = m.num_experts, cfg.d_model, m.expert_mlp_dim, cfg.init_std

        # Router logits in f32 whatever the compute dtype (small logit errors flip top-k).
        self.router = Linear(d, e, in_axes=("embed",), out_axes=("expert",), rngs=rngs,
                             std=std, dtype=jnp.float32, param_dtype=pdt)
        self.router_bias = (logical_param(jnp.zeros((e,), jnp.float32), ("expert",), cls=RouterBias)
                            if self.bias_update_rate > 0 else None)
        # Routed experts, stacked on a leading "expert" axis (sharded by expert parallelism).
        self.w_gate = param(rngs, (e, d, f), ("expert", "embed", "mlp"), std=std, dtype=pdt) if gated else None
        self.w_up = param(rngs, (e, d, f), ("expert", "embed", "mlp"), std=std, dtype=pdt)
        self.w_down = param(rngs, (e, f, d), ("expert", "mlp", "embed"), std=std, dtype=pdt)
        # Shared experts: always on, fused into one dense MLP of width n_shared * shared_dim
        # (arch.mlp.MLP, so it follows model.mlp_bias; routed experts never have biases).
        shared_dim = m.shared_mlp_dim or f
        self.shared = (MLP(cfg, rngs=rngs, mlp_dim=m.num_shared_experts * shared_dim)
                       if m.num_shared_experts else None)

    def expert_weights(self) -> ExpertWeights:
        return ExpertWeights(None if self.w_gate is None else self.w_gate[...],
                             self.w_up[...], self.w_down[...])

    def route(self, x) -> tuple[jax.Array, Routing]:
        """x [N, D] -> (router logits [N, E] f32, Routing)."""
        logits = self.router(x.astype(jnp.float32))
        routing = route(logits, top_k=self.top_k, score_func=self.score_func,
                        norm_topk_prob=self.norm_topk_prob,
                        routed_scaling_factor=self.routed_scaling_factor,
                        n_group=self.n_group, topk_group=self.topk_group,
                        bias=None if self.router_bias is None else self.router_bias[...])
        return logits, routing

    def __call__(self, x, *, segment_ids=None):
        b, t, d = x.shape
        if segment_ids is not None and segment_ids.shape != (b, t):
            raise ValueError(f"segment_ids.shape={segment_ids.shape} must be (batch, seq)={(b, t)}")
        valid = None if segment_ids is None else segment_ids.reshape(-1) != 0  # [N]
        logits, r = self.route(x.reshape(b * t, d))  # from x itself, not its bf16 rounding
        xf = x.astype(self.dtype).reshape(b * t, d)                           # [N, D]
        w = self.expert_weights()

        dropped = jnp.zeros((), jnp.float32)
        if self.dispatch == "dropless":
            y = dropless_moe(xf, r.experts, r.weights, w, self.act, gmm_impl=self.gmm_impl,
                             precision=self.precision)
        elif self.dispatch == "dense":
            y = moe_dense_reference(xf, r.experts, r.weights, w, self.act, precision=self.precision)
        else:
            cap = expert_capacity(b * t, self.top_k, self.num_experts, self.capacity_factor)
            y, keep = capacity_moe(xf, r.experts, r.weights, w, self.act, capacity=cap, valid=valid,
                                   precision=self.precision)
            vk = jnp.ones((b * t, 1)) if valid is None else valid[:, None].astype(jnp.float32)
            total = jnp.maximum(vk.sum() * self.top_k, 1.0)
            dropped = jnp.sum((1.0 - keep.astype(jnp.float32)) * vk) / total
        if self.shared is not None:
            y = y + self.shared(xf)
        y = y.reshape(b, t, d).astype(x.dtype)

        if self.aux_loss_granularity == "sequence":
            mask = jnp.ones((b, t), jnp.bool_) if valid is None else valid.reshape(b, t)
            aux_loss = sequence_balance_loss(
                r.scores.reshape(b, t, -1), r.experts.reshape(b, t, -1), mask,
                top_k=self.top_k, coef=self.aux_loss_coef)
        else:
            aux_loss = load_balance_loss(r.scores, r.experts, valid, top_k=self.top_k,
                                         coef=self.aux_loss_coef)
        aux = {
            "moe_aux_loss": aux_loss,
            "moe_z_loss": router_z_loss(logits, valid, coef=self.z_loss_coef),
            "expert_load": expert_counts(r.experts, self.num_experts, valid),
            "dropped_fraction": dropped,
        }
        return y, aux


# ----------------------------------------------------------------------------- balancing
def update_router_bias(moe: MoE, expert_load, rate: float | None = None) -> None:
    """Aux-loss-free balancing step (DeepSeek-V3 sec. 2.1.2): b += rate * sign(mean(load) - load).

    Under-loaded experts get a larger selection bias, over-loaded ones a smaller one.
    `expert_load` is [E], or [L, E] for a module whose weights are stacked over L layers
    (nnx.scan); the mean is over experts of each layer. `rate` defaults to
    moe.bias_update_rate. A module without a bias (bias_update_rate=0) is left alone.
    """
    if moe.router_bias is None:
        return
    rate = moe.bias_update_rate if rate is None else rate
    bias = moe.router_bias[...]
    load = jnp.asarray(expert_load, jnp.float32).reshape(bias.shape)
    delta = rate * jnp.sign(load.mean(-1, keepdims=True) - load)
    moe.router_bias[...] = bias + delta


def moe_modules(model) -> list[tuple[tuple, MoE]]:
    """All MoE modules under `model` as (path, module), in natural path order.

    Natural order compares integers as integers (layers/2 before layers/10), so for a
    model that keeps its layers in a list, this is layer order: the order in which
    the model should stack per-layer expert loads into its aux (see below).
    """
    def key(item):
        return [tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(part)))
                for part in item[0]]
    found = [(tuple(path), node) for path, node in nnx.iter_graph(model) if isinstance(node, MoE)]
    return sorted(found, key=key)


def _expert_loads(aux):
    """The per-layer loads from any of the aux layouts `update_router_biases` accepts."""
    if not isinstance(aux, dict):
        return aux
    if "expert_load" in aux:
        return aux["expert_load"]
    layers = aux.get("layers")
    if isinstance(layers, dict) and "expert_load" in layers:
        return layers["expert_load"]                                      # scanned: [L, E]
    if isinstance(layers, (list, tuple)):
        return [a["expert_load"] for a in layers if "expert_load" in a]   # MoE layers in order
    raise ValueError(f"aux has no 'expert_load' (keys: {sorted(aux)}); pass the MoE layers' loads")


def update_router_biases(model, aux, rate: float | None = None) -> None:
    """Aux-loss-free bias update for every MoE layer of `model`; call after each train step.

    Args:
      model: any nnx module (a single MoE, a block, a whole LM).
      aux: where the per-layer expert loads are, in `moe_modules(model)` order:
        - a single MoE's own aux: `aux["expert_load"]` is [E];
        - any dict with `aux["expert_load"]` of shape [num_moe_layers, E] (or a list of [E]);
        - the aux of arch/model.py: `aux["layers"]` is a list of per-layer dicts (the
          MoE layers' "expert_load" are taken in order, dense layers skipped) or, with
          scan_layers, a dict of stacked arrays whose "expert_load" is [L, E];
        - or the loads themselves (an array or a list).
        A module whose weights are stacked over L layers (nnx.scan) consumes L rows.
      rate: overrides each module's moe.bias_update_rate.

    Works eagerly or inside an nnx.jit'ed train step (it assigns RouterBias values).
    """
    mods = moe_modules(model)
    if not mods:
        return
    loads = _expert_loads(aux)
    if isinstance(loads, (list, tuple)):
        loads = jnp.stack([jnp.asarray(v) for v in loads])
    e = mods[0][1].num_experts
    loads = jnp.asarray(loads, jnp.float32).reshape(-1, e)                     # [rows, E]
    # A module's router kernel is [D, E], or [L, D, E] when stacked over L layers.
    rows = [math.prod(mod.router.kernel.shape[:-2]) for _, mod in mods]
    if loads.shape[0] != sum(rows):
        raise ValueError(f"aux['expert_load'] has {loads.shape[0]} rows of {e} experts; the model "
                         f"has {sum(rows)} MoE layers (in moe_modules order: {[p for p, _ in mods]})")
    start = 0
    for (_, mod), n in zip(mods, rows, strict=True):
        update_router_bias(mod, loads[start:start + n].reshape(mod.router.kernel.shape[:-2] + (e,)), rate)
        start += n
