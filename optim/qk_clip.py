"""QK-Clip (MuonClip, Kimi Team 2025, "Kimi K2: Open Agentic Intelligence", §2.1).

After each optimizer step, every attention head h whose largest pre-softmax logit on the
step's batch, S_max_h, exceeds tau has its query and key weights shrunk so that this
logit would have been tau:

    gamma_h = min(1, tau / S_max_h)
    MHA:  W_q,h <- sqrt(gamma_h) W_q,h,   W_k,h <- sqrt(gamma_h) W_k,h
    MLA:  q_C,h and k_C,h by sqrt(gamma_h), q_R,h by gamma_h; the rotary key k_R is shared
          by all heads and never touched (the query side carries gamma_h alone).

Logits are bilinear in W_q and W_k (RoPE rotates q and k orthogonally, biases scale with
their kernel), so the head's logits are multiplied by exactly gamma_h and the clipped
head's maximum becomes tau; heads at or below tau are multiplied by 1.0 (unchanged bit for
bit).

GQA (our choice; K2 uses MLA): query heads h = g*G .. g*G + G-1 share key head g. With
gamma_min,g the smallest gamma of the group,

    W_k,g <- sqrt(gamma_min,g) W_k,g,   W_q,h <- gamma_h / sqrt(gamma_min,g) W_q,h

so every head's logits are scaled by its own gamma_h (a clipped head ends at tau, the
others keep their logits), and for MHA (G = 1) it is K2's sqrt/sqrt split. Groups with no
head above tau are unchanged bit for bit; an unclipped head inside a clipped group keeps
its logits but its W_q grows by 1/sqrt(gamma_min,g) to balance the shared key.

With QK-norm the logits do not depend on the scale of W_q and W_k, so `qk_clip` refuses
modules that have `q_norm`/`k_norm` parameters.

Interface. `max_logits` is S_max (f32, the max over the batch of sm_scale * q.k) either
as the model reports it, `aux["max_logits"]` [L, H] for the layers of arch/model.py's
stack ("stack/layers/{i}/attn", or "stack/layers/attn" with [L, ...] parameters when
scanned), or as a dict from "/"-joined attention module paths to [H] (or [L, H] for a
scanned module). Parameter names under a path: MHA/GQA `q/kernel` [(L,) embed, H, D] (+ `q/bias` [(L,) H, D]) and `k/kernel`
[(L,) embed, Hkv, D] (+ `k/bias`); MLA `wq_b/kernel` (or `wq/kernel`)
[(L,) q_lora_rank | embed, H, nope + rope] and `wkv_b/kernel` [(L,) kv_lora_rank, H, nope + v].
Only elementwise products: it runs on sharded parameters as they are.

Example (in a train step, after `optimizer.update(model, grads)`):

    state = nnx.state(model, nnx.Param)
    nnx.update(model, qk_clip(state, aux["max_logits"], tau=100.0))
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from optim.labels import Path, map_params

MHA_Q, MHA_K = ("q",), ("k",)
MLA_Q, MLA_KV = (("wq_b",), ("wq",)), ("wkv_b",)


def qk_clip_factors(max_logits: jax.Array, tau: float) -> jax.Array:
    """gamma = min(1, tau / S_max) per head (1 where S_max <= tau, also for -inf/0)."""
    s = jnp.asarray(max_logits, jnp.float32)
    return jnp.where(s > tau, tau / jnp.where(s > tau, s, 1.0), 1.0)


def _head_factor(f: jax.Array, ndim: int) -> jax.Array:
    """[*lead, H] -> [*lead, 1.., H, 1] to scale a parameter [*lead, ..., H, D]."""
    lead, h = f.shape[:-1], f.shape[-1]
    return f.reshape(lead + (1,) * (ndim - len(lead) - 2) + (h, 1))


def _clip_mha(found: dict[Path, jax.Array], prefix: Path, gamma: jax.Array, out: dict):
    h = gamma.shape[-1]
    hkv = found[prefix + MHA_K + ("kernel",)].shape[-2]
    if h % hkv:
        raise ValueError(f"{'/'.join(prefix)}: {h=} query heads must be a multiple of {hkv=}")
    g = gamma.reshape(gamma.shape[:-1] + (hkv, h // hkv))   # [*lead, Hkv, G]
    g_min = jnp.min(g, axis=-1)                              # [*lead, Hkv]
    k_f = jnp.sqrt(g_min)
    q_f = (g / k_f[..., None]).reshape(gamma.shape)          # gamma_h / sqrt(gamma_min,g)
    for leaf in ("kernel", "bias"):
        for proj, f in ((MHA_Q, q_f), (MHA_K, k_f)):
            p = prefix + proj + (leaf,)
            if p in found:
                out[p] = _head_factor(f, found[p].ndim)


def _clip_mla(found: dict[Path, jax.Array], prefix: Path, gamma: jax.Array, out: dict,
              nope: int | None):
    if nope is None:
        raise ValueError(f"{'/'.join(prefix)}: MLA needs qk_nope_head_dim (model.mla.qk_nope_head_dim)")
    q_path = next(prefix + q + ("kernel",) for q in MLA_Q if prefix + q + ("kernel",) in found)
    kv_path = prefix + MLA_KV + ("kernel",)
    sq = jnp.sqrt(gamma)[..., None]                          # [*lead, H, 1]
    q_d, kv_d = found[q_path].shape[-1], found[kv_path].shape[-1]
    # q = [q_C (nope) | q_R (rope)]: sqrt(gamma) on q_C, gamma on q_R.
    q_f = jnp.concatenate([jnp.broadcast_to(sq, sq.shape[:-1] + (nope,)),
                           jnp.broadcast_to(gamma[..., None], gamma.shape + (q_d - nope,))], -1)
    # kv = [k_C (nope) | v]: sqrt(gamma) on k_C, values untouched.
    kv_f = jnp.concatenate([jnp.broadcast_to(sq, sq.shape[:-1] + (nope,)),
                            jnp.ones(gamma.shape + (kv_d - nope,), jnp.float32)], -1)
    for p, f in ((q_path, q_f), (kv_path, kv_f)):             # f: [*lead, H, D]
        lead = f.shape[:-2]
        out[p] = f.reshape(lead + (1,) * (found[p].ndim - len(lead) - 2) + f.shape[-2:])


def stack_paths(params, num_layers: int, stack: str = "stack") -> list[str] | str:
    """Attention paths of a layer stack (arch/model.py `LayerStack` of `Block`s with `.attn`).

    Returns the one scanned path "stack/layers/attn" (parameters [L, ...]) or the
    per-layer paths ["stack/layers/0/attn", ...].
    """
    paths = _all_paths(params)
    scanned = f"{stack}/layers/attn"
    if any(p.startswith(scanned + "/") for p in paths):
        return scanned
    per_layer = [f"{stack}/layers/{i}/attn" for i in range(num_layers)]
    missing = [p for p in per_layer if not any(q.startswith(p + "/") for q in paths)]
    if missing:
        raise ValueError(f"max_logits has {num_layers} layers but params lack {missing[:3]}; "
                         "pass a dict {attention path: [H]} instead")
    return per_layer


def _all_paths(params) -> list[str]:
    out = []
    map_params(lambda p, _: out.append("/".join(p)), params)
    return out


def as_path_dict(params, max_logits, stack: str = "stack") -> dict[str, jax.Array]:
    """`max_logits` as {path: [H] or [L, H]}: a dict passes through; an [L, H] array (the
    model's aux["max_logits"]) is assigned to the layers of `stack`."""
    if isinstance(max_logits, Mapping):
        return dict(max_logits)
    if jnp.ndim(max_logits) != 2:
        raise ValueError(f"max_logits must be a dict or an [layers, heads] array, got shape "
                         f"{jnp.shape(max_logits)}")
    paths = stack_paths(params, max_logits.shape[0], stack)
    if isinstance(paths, str):
        return {paths: max_logits}
    return {p: max_logits[i] for i, p in enumerate(paths)}


def qk_clip(params, max_logits: Mapping[str, jax.Array] | jax.Array, *, tau: float,
            qk_nope_head_dim: int | None = None, stack: str = "stack"):
    """Rescale query/key weights of every head whose max logit exceeds `tau`.

    Args:
      params: parameter tree (an nnx.State of Params or of arrays, or nested dicts).
      max_logits: {"/"-joined attention module path: S_max [H] or [L, H]}, or the
        model's aux["max_logits"] [L, H] for the layers of `stack`.
      tau: the logit threshold (Kimi K2: 100).
      qk_nope_head_dim: MLA only, width of the non-rotary part of each q/k head.
      stack: path of the layer stack that an [L, H] array belongs to.

    Returns:
      The tree with the same structure, q/k weights scaled.

    Raises:
      ValueError: tau <= 0, a path with no attention parameters, QK-norm, shapes that
        do not match the heads of `max_logits`.
    """
    if not tau > 0:
        raise ValueError(f"{tau=} must be > 0")
    found: dict[Path, jax.Array] = {}

    def collect(p, x):
        found[p] = x.get_value() if isinstance(x, nnx.Variable) else x
    map_params(collect, params)

    factors: dict[Path, jax.Array] = {}
    for key, s_max in as_path_dict(params, max_logits, stack).items():
        prefix = tuple(key.split("/")) if isinstance(key, str) else tuple(map(str, key))
        gamma = qk_clip_factors(s_max, tau)
        if prefix + MLA_KV + ("kernel",) in found:
            _clip_mla(found, prefix, gamma, factors, qk_nope_head_dim)
        elif prefix + MHA_K + ("kernel",) in found:
            # MLA's q_norm sits before wq_b (harmless); MHA's sits after W_q and undoes the scale.
            if any(prefix + (n, "scale") in found for n in ("q_norm", "k_norm")):
                raise ValueError(f"{key!r} uses qk_norm: QK-Clip cannot scale its logits via W_q/W_k")
            _clip_mha(found, prefix, gamma, factors)
        else:
            raise ValueError(f"max_logits key {key!r} names no attention module with "
                             f"{'/'.join(MHA_K)}/kernel or {'/'.join(MLA_KV)}/kernel")
    for p, f in factors.items():
        if f.shape[-2] != found[p].shape[-2] and f.shape[-2] != 1:
            raise ValueError(f"{'/'.join(p)}: shape {found[p].shape} does not match "
                             f"{f.shape[-2]} heads of max_logits")

    def apply(p, x):
        if p not in factors:
            return x
        v = x.get_value() if isinstance(x, nnx.Variable) else x
        new = (v.astype(jnp.float32) * factors[p]).astype(v.dtype)
        return x.replace(new) if isinstance(x, nnx.Variable) else new
    return map_params(apply, params)
