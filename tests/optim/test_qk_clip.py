"""QK-Clip (Kimi K2): after clipping, per-head max logits recomputed on the same batch are <= tau.

The attention here is written in the test from the paper's definitions (projections,
RoPE, MLA's decoupled rotary key) and scored with the independent
`max_logits_reference`; heads at or below tau and MLA's shared k_R must be untouched.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from arch.model import build_model
from configs.base import mla_defaults, model_defaults
from optim import qk_clip, qk_clip_factors
from pallas_kernels.flash_attention.reference import max_logits_reference

TOL = 1e-4


def rope(x, pos, theta=10000.0):
    """Rotate-half RoPE on the last axis of x [B, T, H, D]."""
    d = x.shape[-1]
    freq = theta ** (-jnp.arange(0, d // 2) / (d // 2))
    ang = pos[:, :, None, None] * freq  # [B, T, 1, D/2]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return jnp.concatenate([x1 * jnp.cos(ang) - x2 * jnp.sin(ang), x2 * jnp.cos(ang) + x1 * jnp.sin(ang)], -1)


@jax.jit
def mha_max_logits(p, x):
    pos = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2]).astype(jnp.float32)
    q = jnp.einsum("btd,dhk->bthk", x, p["q"]["kernel"]) + p["q"].get("bias", 0.0)
    k = jnp.einsum("btd,dhk->bthk", x, p["k"]["kernel"]) + p["k"].get("bias", 0.0)
    return max_logits_reference(rope(q, pos), rope(k, pos), causal=True)


@functools.partial(jax.jit, static_argnums=(2, 3))
def mla_max_logits(p, x, nope, kv_lora):
    pos = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2]).astype(jnp.float32)
    q = jnp.einsum("btd,dhk->bthk", x, p["wq"]["kernel"])                 # [B, T, H, nope+rope]
    kv = x @ p["wkv_a"]["kernel"]                                           # [B, T, kv_lora+rope]
    k_c = jnp.einsum("btc,chk->bthk", kv[..., :kv_lora], p["wkv_b"]["kernel"][..., :nope])
    k_r = rope(kv[..., None, kv_lora:], pos)                                # one shared head
    h = q.shape[2]
    q = jnp.concatenate([q[..., :nope], rope(q[..., nope:], pos)], -1)
    k = jnp.concatenate([k_c, jnp.broadcast_to(k_r, k_c.shape[:3] + k_r.shape[-1:])], -1)
    assert k.shape[2] == h
    return max_logits_reference(q, k, causal=True)


def _normal(key, shape, std):
    return jax.random.normal(key, shape) * std


def _mha_params(key, d, h, hkv, hd, bias):
    ks = jax.random.split(key, 4)
    # Head-dependent scales so that some heads sit far above tau and others below.
    hs = jnp.linspace(0.3, 2.0, h)[None, :, None]
    p = {"q": {"kernel": _normal(ks[0], (d, h, hd), 0.5) * hs},
         "k": {"kernel": _normal(ks[1], (d, hkv, hd), 0.5)}}
    if bias:
        p["q"]["bias"] = _normal(ks[2], (h, hd), 0.5)
        p["k"]["bias"] = _normal(ks[3], (hkv, hd), 0.5)
    return p


@pytest.mark.parametrize("h,hkv,bias", [(4, 4, False), (8, 2, True), (6, 1, False)])
def test_mha_gqa_clip(h, hkv, bias):
    d, hd = 16, 8
    params = {"attn": _mha_params(jax.random.key(0), d, h, hkv, hd, bias)}
    x = jax.random.normal(jax.random.key(1), (2, 12, d))
    s = mha_max_logits(params["attn"], x)
    tau = float(jnp.median(s))
    clipped = qk_clip(params, {"attn": s}, tau=tau)
    s_new = mha_max_logits(clipped["attn"], x)
    assert (s_new <= tau + TOL).all(), (s_new, tau)
    above = s > tau
    np.testing.assert_allclose(s_new[above], tau, rtol=TOL)          # clipped heads land on tau
    np.testing.assert_allclose(s_new[~above], s[~above], rtol=TOL)   # the others keep their logits
    # Groups with no head above tau are untouched bit for bit (all of them for MHA).
    group_clipped = above.reshape(hkv, h // hkv).any(-1)
    q_new = clipped["attn"]["q"]["kernel"].reshape(d, hkv, h // hkv, hd)
    q_old = params["attn"]["q"]["kernel"].reshape(d, hkv, h // hkv, hd)
    for g in np.flatnonzero(~group_clipped):
        np.testing.assert_array_equal(q_new[:, g], q_old[:, g])
        np.testing.assert_array_equal(clipped["attn"]["k"]["kernel"][:, g], params["attn"]["k"]["kernel"][:, g])
    if hkv == h:  # MHA: K2's split, sqrt(gamma) on both sides
        gamma = qk_clip_factors(s, tau)
        np.testing.assert_allclose(clipped["attn"]["k"]["kernel"],
                                   params["attn"]["k"]["kernel"] * jnp.sqrt(gamma)[None, :, None], rtol=1e-6)


def test_mla_clip_never_touches_shared_rotary_key():
    d, h, nope, rope_d, v, kv_lora = 16, 4, 8, 4, 8, 12
    ks = jax.random.split(jax.random.key(0), 3)
    hs = jnp.linspace(0.3, 2.0, h)[None, :, None]
    params = {"layers": {"0": {"attn": {
        "wq": {"kernel": _normal(ks[0], (d, h, nope + rope_d), 0.6) * hs},
        "wkv_a": {"kernel": _normal(ks[1], (d, kv_lora + rope_d), 0.6)},
        "wkv_b": {"kernel": _normal(ks[2], (kv_lora, h, nope + v), 0.6)},
    }}}}
    attn = lambda p: p["layers"]["0"]["attn"]
    x = jax.random.normal(jax.random.key(1), (2, 10, d))
    s = mla_max_logits(attn(params), x, nope, kv_lora)
    tau = float(jnp.median(s))
    clipped = qk_clip(params, {"layers/0/attn": s}, tau=tau, qk_nope_head_dim=nope)
    s_new = mla_max_logits(attn(clipped), x, nope, kv_lora)
    assert (s_new <= tau + TOL).all(), (s_new, tau)
    above = np.asarray(s > tau)
    np.testing.assert_allclose(s_new[above], tau, rtol=TOL)
    np.testing.assert_allclose(s_new[~above], s[~above], rtol=TOL)
    # k_R (inside wkv_a) and the value columns of wkv_b are never touched.
    np.testing.assert_array_equal(attn(clipped)["wkv_a"]["kernel"], attn(params)["wkv_a"]["kernel"])
    np.testing.assert_array_equal(attn(clipped)["wkv_b"]["kernel"][..., nope:],
                                  attn(params)["wkv_b"]["kernel"][..., nope:])
    for i in np.flatnonzero(~above):
        np.testing.assert_array_equal(attn(clipped)["wq"]["kernel"][:, i], attn(params)["wq"]["kernel"][:, i])
    # q_R by gamma, q_C and k_C by sqrt(gamma).
    gamma = qk_clip_factors(s, tau)
    np.testing.assert_allclose(attn(clipped)["wq"]["kernel"][..., nope:],
                               attn(params)["wq"]["kernel"][..., nope:] * gamma[None, :, None], rtol=1e-6)
    np.testing.assert_allclose(attn(clipped)["wkv_b"]["kernel"][..., :nope],
                               attn(params)["wkv_b"]["kernel"][..., :nope] * jnp.sqrt(gamma)[None, :, None],
                               rtol=1e-6)


@pytest.mark.parametrize("variant", ["gqa", "gqa_scan", "mla"])
def test_real_model_max_logits_after_clip(variant):
    """arch/model.py's aux["max_logits"] [L, H] drives the clip; its own recount stays <= tau.

    Layer 0 sees the same input after the clip, so its bound is exact. Deeper layers see
    inputs changed by the clip below them, so their recounted logits may move either way
    (QK-Clip bounds the logits of the batch it was computed on, layer by layer).
    """
    cfg = model_defaults()
    cfg.update(num_layers=2, track_max_logits=True, init_std=0.5, scan_layers=variant == "gqa_scan")
    nope = None
    if variant == "mla":
        cfg.mla = mla_defaults()
        nope = cfg.mla.qk_nope_head_dim
    model = build_model(cfg, nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    _, aux = model(tokens)
    s = aux["max_logits"]
    assert s.shape == (2, cfg.num_heads)
    tau = float(jnp.median(s))
    before = nnx.state(model, nnx.Param)
    nnx.update(model, qk_clip(before, s, tau=tau, qk_nope_head_dim=nope))
    _, aux2 = model(tokens)
    assert (aux2["max_logits"][0] <= tau + TOL * tau).all(), (aux2["max_logits"], tau)
    np.testing.assert_allclose(aux2["max_logits"][0][s[0] > tau], tau, rtol=TOL)


def test_errors():
    params = {"attn": _mha_params(jax.random.key(0), 8, 4, 2, 4, False)}
    with pytest.raises(ValueError, match="tau"):
        qk_clip(params, {"attn": jnp.ones(4)}, tau=0.0)
    with pytest.raises(ValueError, match="names no attention"):
        qk_clip(params, {"mlp": jnp.ones(4)}, tau=1.0)
    with pytest.raises(ValueError, match="heads"):
        qk_clip(params, {"attn": jnp.ones(3)}, tau=1.0)
    normed = {"attn": {**params["attn"], "q_norm": {"scale": jnp.ones(4)}}}
    with pytest.raises(ValueError, match="qk_norm"):
        qk_clip(normed, {"attn": jnp.ones(4)}, tau=1.0)
    mla = {"attn": {"wq": {"kernel": jnp.ones((8, 4, 6))}, "wkv_b": {"kernel": jnp.ones((5, 4, 8))}}}
    with pytest.raises(ValueError, match="qk_nope_head_dim"):
        qk_clip(mla, {"attn": jnp.ones(4)}, tau=1.0)


# A tiny attention-only LM (embedding -> one attention layer -> head), to watch logits grow.
def _lm_init(key, v=32, d=16, h=4, hd=8):
    ks = jax.random.split(key, 5)
    return {"embed": _normal(ks[0], (v, d), 1.0),
            "attn": {"q": {"kernel": _normal(ks[1], (d, h, hd), d**-0.5)},
                     "k": {"kernel": _normal(ks[2], (d, h, hd), d**-0.5)},
                     "v": {"kernel": _normal(ks[3], (d, h, hd), d**-0.5)}},
            "head": _normal(ks[4], (h * hd, v), (h * hd) ** -0.5)}


def _lm_loss(p, tokens):
    x = p["embed"][tokens[:, :-1]]
    pos = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2]).astype(jnp.float32)
    q = rope(jnp.einsum("btd,dhk->bthk", x, p["attn"]["q"]["kernel"]), pos)
    k = rope(jnp.einsum("btd,dhk->bthk", x, p["attn"]["k"]["kernel"]), pos)
    vv = jnp.einsum("btd,dhk->bthk", x, p["attn"]["v"]["kernel"])
    o = jax.nn.dot_product_attention(q, k, vv, is_causal=True)
    logits = o.reshape(o.shape[:2] + (-1,)) @ p["head"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return loss, max_logits_reference(q, k, causal=True)


def _train(tau, steps=25):
    # Copying task: a sequence repeats, so attention must sharpen; the high lr makes it overshoot.
    base = jax.random.randint(jax.random.key(2), (8, 8), 0, 32)
    tokens = jnp.concatenate([base, base], 1)
    tx = optax.adam(0.1)
    params = _lm_init(jax.random.key(0))
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        (_, s), g = jax.value_and_grad(_lm_loss, has_aux=True)(params, tokens)
        u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
        _, s_after = _lm_loss(params, tokens)  # this batch's logits after the step
        if tau is not None:
            params = qk_clip(params, {"attn": s_after}, tau=tau)
            _, s_after = _lm_loss(params, tokens)
        return params, state, s_after

    history = []
    for _ in range(steps):
        params, state, s = step(params, state)
        history.append(float(s.max()))
    return np.array(history)


def test_high_lr_logits_grow_without_clip_and_stay_at_tau_with_it():
    tau = 10.0
    free = _train(None)
    clipped = _train(tau)
    assert free.max() > 3 * tau, free   # logits explode without QK-Clip
    assert (clipped <= tau + TOL * tau).all(), clipped
    assert clipped.max() > 0.99 * tau   # and the clip is what holds them
