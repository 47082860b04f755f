"""Tests for arch/mla.py against a float64 numpy MLA written from the DeepSeek-V2 equations.

The reference uses the paper's matrix names (W_DQ, W_UQ, W_QR, W_DKV, W_KR, W_UK, W_UV,
W_O) and Hugging Face's own RoPE functions (`apply_rotary_pos_emb` and
`apply_rotary_pos_emb_interleave`, transcribed), so it shares no code with the module.
"""

import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from arch.mla import MLAttention, mla_attention, mla_softmax_scale
from arch.positional import rope_frequencies
from configs.base import mla_defaults, model_defaults

B, T = 2, 7  # odd sequence length on purpose


def make_cfg(**mla_overrides):
    """A small odd-shaped model config (3 heads, T=7); `mla_overrides` replace MLA fields."""
    cfg = model_defaults()
    cfg.d_model, cfg.num_heads = 24, 3
    mla = mla_defaults().to_dict() | dict(
        kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5
    )
    mla.update(mla_overrides)
    cfg.mla = ml_collections.ConfigDict(mla)
    return cfg


def make_layer(cfg, seed=0, layer_kind="global"):
    """The layer with every parameter (norm scales and biases too) randomised."""
    layer = MLAttention(cfg, rngs=nnx.Rngs(params=seed), layer_kind=layer_kind)
    state = nnx.state(layer, nnx.Param)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    new = []
    for (path, leaf), key in zip(leaves, keys, strict=True):
        noise = jax.random.normal(key, leaf.shape, leaf.dtype)
        is_norm_scale = "scale" in jax.tree_util.keystr(path)
        new.append(1.0 + 0.2 * noise if is_norm_scale else 0.3 * noise)
    nnx.update(layer, jax.tree_util.tree_unflatten(treedef, new))
    return layer


def flat_params(layer):
    return dict(nnx.to_flat_state(nnx.state(layer, nnx.Param)))


def inputs(cfg, seed=1, packed=True):
    x = jax.random.normal(jax.random.key(seed), (B, T, cfg.d_model), jnp.float32)
    if packed:  # row 0: two documents and a padding token; row 1: one document
        seg = jnp.array([[1, 1, 1, 2, 2, 2, 0], [1] * T], jnp.int32)
        pos = jnp.array([[0, 1, 2, 0, 1, 2, 0], list(range(T))], jnp.int32)
    else:
        seg, pos = None, jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return x, pos, seg


# ---------------------------------------------------------------------------- numpy reference


def hf_rope(x, pos, inv_freq, *, interleave, attention_factor=1.0):
    """HF DeepseekV3 RoPE on x [B, T, H, R]: rotate halves, after the pair->half permutation if `interleave`."""
    freqs = pos[..., None].astype(np.float64) * np.asarray(inv_freq, np.float64)  # [B, T, R/2]
    emb = np.concatenate([freqs, freqs], -1)[:, :, None, :]
    cos, sin = np.cos(emb) * attention_factor, np.sin(emb) * attention_factor
    b, t, h, d = x.shape
    if interleave:  # q.view(b, h, s, d // 2, 2).transpose(4, 3).reshape(b, h, s, d)
        x = x.reshape(b, t, h, d // 2, 2).swapaxes(-1, -2).reshape(b, t, h, d)
    rotate_half = np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + rotate_half * sin


def rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def paper_weights(layer):
    """Module parameters under the DeepSeek-V2 paper's names, in float64."""
    f = lambda v: np.asarray(v[...], np.float64)
    nope, c = layer.nope, layer.kv_lora_rank
    w = {}
    if layer.q_lora_rank is None:
        wq = f(layer.wq.kernel)
    else:
        w["W_DQ"], w["g_q"] = f(layer.wq_a.kernel), f(layer.q_norm.scale)
        w["b_DQ"] = 0.0 if layer.wq_a.bias is None else f(layer.wq_a.bias)
        wq = f(layer.wq_b.kernel)
    w["W_UQ"], w["W_QR"] = wq[..., :nope], wq[..., nope:]
    wkv_a = f(layer.wkv_a.kernel)
    b_kv_a = np.zeros(wkv_a.shape[-1]) if layer.wkv_a.bias is None else f(layer.wkv_a.bias)
    w["W_DKV"], w["b_DKV"] = wkv_a[:, :c], b_kv_a[:c]
    w["W_KR"], w["b_KR"] = wkv_a[:, c:], b_kv_a[c:]
    w["g_kv"] = f(layer.kv_norm.scale)
    wkv_b = f(layer.wkv_b.kernel)
    w["W_UK"], w["W_UV"] = wkv_b[..., :nope], wkv_b[..., nope:]
    w["W_O"] = f(layer.wo.kernel)
    w["b_O"] = 0.0 if layer.wo.bias is None else f(layer.wo.bias)
    return w


def mla_reference(
    h,
    w,
    pos,
    seg,
    *,
    sm_scale,
    inv_freq,
    interleave,
    eps,
    causal=True,
    window=None,
    attention_factor=1.0,
):
    """DeepSeek-V2 eqs. (37)-(47) in float64. Returns (u [B,T,D], max logit per head [H])."""
    h = np.asarray(h, np.float64)
    pos = np.asarray(pos)
    rope = lambda x: hf_rope(
        x, pos, inv_freq, interleave=interleave, attention_factor=attention_factor
    )
    if "W_DQ" in w:
        c_q = rms(h @ w["W_DQ"] + w["b_DQ"], w["g_q"], eps)  # (37)
    else:
        c_q = h  # full-rank query: W_UQ, W_QR act on h directly
    q_c = np.einsum("btc,chn->bthn", c_q, w["W_UQ"])  # (38)
    q_r = rope(np.einsum("btc,chr->bthr", c_q, w["W_QR"]))  # (39)
    c_kv = rms(h @ w["W_DKV"] + w["b_DKV"], w["g_kv"], eps)  # (41)
    k_c = np.einsum("bsc,chn->bshn", c_kv, w["W_UK"])  # (42)
    k_r = rope((h @ w["W_KR"] + w["b_KR"])[:, :, None, :])  # (43), one head shared by all
    v_c = np.einsum("bsc,chv->bshv", c_kv, w["W_UV"])  # (45)
    q = np.concatenate([q_c, q_r], -1)  # (40)
    k = np.concatenate([k_c, np.broadcast_to(k_r, k_c.shape[:3] + k_r.shape[-1:])], -1)  # (44)
    s = np.einsum("bthd,bshd->bhts", q, k) * sm_scale
    t_idx, s_idx = np.arange(h.shape[1])[:, None], np.arange(h.shape[1])[None, :]
    keep = np.ones((h.shape[0], 1, h.shape[1], h.shape[1]), bool)
    if causal:
        keep &= s_idx <= t_idx
    if window is not None:
        keep &= t_idx - s_idx < window
    if seg is not None:
        seg = np.asarray(seg)
        keep &= (seg[:, :, None] == seg[:, None, :])[:, None]
    s = np.where(keep, s, -np.inf)
    max_logits = s.max(axis=(0, 2, 3))
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshv->bthv", p, v_c)  # (46)
    u = np.einsum("bthv,hvd->btd", o, w["W_O"]) + w["b_O"]  # (47)
    return u, max_logits


def reference_for(layer, cfg, x, pos, seg, **kw):
    """`mla_reference` for this layer's weights and config; `kw` overrides its arguments."""
    inv_freq, _ = rope_frequencies(cfg.mla.qk_rope_head_dim, cfg.rope_theta)
    qk = cfg.mla.qk_nope_head_dim + cfg.mla.qk_rope_head_dim
    defaults = dict(sm_scale=qk**-0.5, inv_freq=inv_freq, interleave=cfg.rope_interleaved)
    kw = defaults | dict(eps=cfg.norm_eps, causal=cfg.causal) | kw
    return mla_reference(x, paper_weights(layer), pos, seg, **kw)


# ---------------------------------------------------------------------------- naive vs the paper


@pytest.mark.parametrize(
    "q_lora_rank,interleaved,bias",
    [(12, False, False), (12, True, True), (None, False, False), (None, True, True)],
)
def test_naive_matches_paper_reference(q_lora_rank, interleaved, bias):
    cfg = make_cfg(q_lora_rank=q_lora_rank)
    cfg.rope_interleaved, cfg.attn_bias, cfg.attn_out_bias = interleaved, bias, bias
    cfg.track_max_logits = True
    layer = make_layer(cfg)
    x, pos, seg = inputs(cfg)
    y, aux = layer(x, positions=pos, segment_ids=seg)
    y_ref, max_ref = reference_for(layer, cfg, x, pos, seg)
    chex.assert_shape(y, (B, T, cfg.d_model))
    chex.assert_trees_all_close(y, y_ref.astype(np.float32), atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(aux["max_logits"], max_ref.astype(np.float32), atol=1e-5, rtol=1e-5)


def test_non_causal_and_local_window_match_reference():
    cfg = make_cfg(q_lora_rank=8)
    cfg.causal = False
    layer = make_layer(cfg)
    x, pos, _ = inputs(cfg, packed=False)
    y, _ = layer(x, positions=pos)
    chex.assert_trees_all_close(
        y, reference_for(layer, cfg, x, pos, None)[0].astype(np.float32), atol=1e-5, rtol=1e-5
    )

    cfg = make_cfg(q_lora_rank=8)
    cfg.sliding_window, cfg.rope_local_theta = 3, 500.0
    layer = make_layer(cfg, layer_kind="local")
    y, _ = layer(x, positions=pos)
    inv_freq, _ = rope_frequencies(cfg.mla.qk_rope_head_dim, 500.0)
    y_ref, _ = reference_for(layer, cfg, x, pos, None, window=3, inv_freq=inv_freq)
    chex.assert_trees_all_close(y, y_ref.astype(np.float32), atol=1e-5, rtol=1e-5)


def test_parameter_names_shapes_and_axes():
    cfg = make_cfg(q_lora_rank=12)
    h, d, c, nope, rope, v = 3, 24, 10, 6, 4, 5
    expected = {
        ("wq_a", "kernel"): ((d, 12), ("embed", "latent")),
        ("q_norm", "scale"): ((12,), ("latent",)),
        ("wq_b", "kernel"): ((12, h, nope + rope), ("latent", "heads", "head_dim")),
        ("wkv_a", "kernel"): ((d, c + rope), ("embed", "latent")),
        ("kv_norm", "scale"): ((c,), ("latent",)),
        ("wkv_b", "kernel"): ((c, h, nope + v), ("latent", "heads", "head_dim")),
        ("wo", "kernel"): ((h, v, d), ("heads", "head_dim", "embed")),
    }
    layer = MLAttention(cfg, rngs=nnx.Rngs(params=0))
    got = {
        p: (var[...].shape, var.get_metadata()["out_sharding"])
        for p, var in flat_params(layer).items()
    }
    assert got == expected
    layer = MLAttention(make_cfg(q_lora_rank=None), rngs=nnx.Rngs(params=0))
    got = {p: var[...].shape for p, var in flat_params(layer).items()}
    assert got[("wq", "kernel")] == (d, h, nope + rope)
    assert ("wq_a", "kernel") not in got and ("q_norm", "scale") not in got


# ---------------------------------------------------------------------------- absorbed vs naive


@pytest.mark.parametrize(
    "q_lora_rank,causal,packed", [(12, True, True), (None, True, False), (12, False, True)]
)
def test_absorbed_equals_naive_f32(q_lora_rank, causal, packed):
    cfg = make_cfg(q_lora_rank=q_lora_rank)
    cfg.causal, cfg.track_max_logits = causal, True
    layer = make_layer(cfg)
    x, pos, seg = inputs(cfg, packed=packed)
    y_naive, aux_naive = layer(x, positions=pos, segment_ids=seg, absorb=False)
    y_abs, aux_abs = layer(x, positions=pos, segment_ids=seg, absorb=True)
    chex.assert_trees_all_close(y_abs, y_naive, atol=2e-6, rtol=2e-6)
    chex.assert_trees_all_close(
        aux_abs["max_logits"], aux_naive["max_logits"], atol=2e-6, rtol=2e-6
    )


def test_absorb_config_switch():
    cfg = make_cfg(q_lora_rank=12, absorb=True)
    layer = make_layer(cfg)
    assert layer.absorb
    x, pos, seg = inputs(cfg)
    y, _ = layer(x, positions=pos, segment_ids=seg)
    chex.assert_trees_all_close(
        y, reference_for(layer, cfg, x, pos, seg)[0].astype(np.float32), atol=1e-5, rtol=1e-5
    )


def test_absorbed_equals_naive_bf16():
    cfg = make_cfg(q_lora_rank=12)
    cfg.dtype = "bfloat16"
    layer = make_layer(cfg)
    x, pos, seg = inputs(cfg)
    y_naive, _ = layer(x, positions=pos, segment_ids=seg, absorb=False)
    y_abs, _ = layer(x, positions=pos, segment_ids=seg, absorb=True)
    y_ref, _ = reference_for(layer, cfg, x, pos, seg)
    chex.assert_type([y_naive, y_abs], jnp.bfloat16)
    scale = np.abs(y_ref).max()
    for y in (y_naive, y_abs):
        chex.assert_trees_all_close(np.asarray(y, np.float32) / scale, y_ref / scale, atol=3e-2)


def test_gradients_naive_vs_absorbed():
    cfg = make_cfg(q_lora_rank=12)
    graphdef, params = nnx.split(make_layer(cfg))
    x, pos, seg = inputs(cfg)
    r = jax.random.normal(jax.random.key(7), (B, T, cfg.d_model))

    def loss(params, x, absorb):
        y, _ = nnx.merge(graphdef, params)(x, positions=pos, segment_ids=seg, absorb=absorb)
        return jnp.sum(y * r)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    chex.assert_trees_all_close(grad(params, x, True), grad(params, x, False), atol=1e-5, rtol=1e-5)
    # The shared gradient is itself right: finite differences on the naive path.
    check_grads(
        jax.jit(lambda x: loss(params, x, False)),
        (x,),
        order=1,
        modes=("rev",),
        atol=2e-2,
        rtol=2e-2,
    )


def test_absorbed_decode_from_latent_matches_full_forward():
    """Serving path: the last token attends to a latent "cache" of the whole row."""
    cfg = make_cfg(q_lora_rank=12)
    layer = make_layer(cfg)
    x, pos, seg = inputs(cfg)
    y_full, _ = layer(x, positions=pos, segment_ids=seg)
    q_nope, q_pe = layer.query(x[:, -1:], pos[:, -1:])  # [B, 1, H, nope], [B, 1, H, rope]
    c_kv, k_pe = layer.latent_kv(x, pos)  # the cache: [B, S, C], [B, S, rope]
    w_uk, w_uv = layer.up_weights()
    kv_idx = jnp.broadcast_to(jnp.arange(T), (B, T))
    o, _ = mla_attention(
        q_nope,
        q_pe,
        c_kv,
        k_pe,
        w_uk,
        w_uv,
        absorb=True,
        sm_scale=layer.sm_scale,
        causal=True,
        segment_ids=(seg[:, -1:], seg),
        q_positions=kv_idx[:, -1:],
        kv_positions=kv_idx,
    )
    chex.assert_shape(o, (B, 1, cfg.num_heads, cfg.mla.v_head_dim))
    chex.assert_trees_all_close(layer.wo(o), y_full[:, -1:], atol=2e-6, rtol=2e-6)


# ---------------------------------------------------------------------------- RoPE and softmax scale


@pytest.mark.parametrize("absorb,interleaved", [(False, False), (True, True)])
def test_rope_is_relative(absorb, interleaved):
    cfg = make_cfg(q_lora_rank=12)
    cfg.rope_interleaved = interleaved
    layer = make_layer(cfg)
    x, pos, seg = inputs(cfg)
    y, _ = layer(x, positions=pos, segment_ids=seg, absorb=absorb)
    shift = jnp.array([[13], [1000]], jnp.int32)  # a different constant per row
    y_shift, _ = layer(x, positions=pos + shift, segment_ids=seg, absorb=absorb)
    chex.assert_trees_all_close(y_shift, y, atol=1e-5, rtol=1e-5)
    # ...while positions do matter: reversing them changes the output.
    y_rev, _ = layer(x, positions=pos[:, ::-1], segment_ids=seg, absorb=absorb)
    assert float(jnp.max(jnp.abs(y_rev - y))) > 1e-3


@pytest.mark.parametrize("mscale,mscale_all_dim", [(1.0, 1.0), (0.707, 0.707), (1.0, 0.5)])
def test_yarn_softmax_scale_and_output(mscale, mscale_all_dim):
    factor = 40.0
    scaling = dict(
        type="yarn",
        factor=factor,
        original_max_position_embeddings=16,
        beta_fast=32.0,
        beta_slow=1.0,
        mscale=mscale,
        mscale_all_dim=mscale_all_dim,
    )
    # HF DeepseekV3Attention: scaling = qk_head_dim**-0.5 * yarn_get_mscale(factor, mscale_all_dim)**2
    hf_mscale = lambda scale, m: 0.1 * m * math.log(scale) + 1.0
    expected = (6 + 4) ** -0.5 * hf_mscale(factor, mscale_all_dim) ** 2
    # ...and cos/sin carry get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim).
    attention_factor = hf_mscale(factor, mscale) / hf_mscale(factor, mscale_all_dim)
    assert mla_softmax_scale(10, scaling) == pytest.approx(expected, rel=1e-12)

    cfg = make_cfg(q_lora_rank=12)
    cfg.rope_scaling = scaling
    layer = make_layer(cfg)
    assert layer.sm_scale == pytest.approx(expected, rel=1e-12)
    x, pos, seg = inputs(cfg)
    y, _ = layer(x, positions=pos, segment_ids=seg)
    inv_freq, _ = rope_frequencies(4, cfg.rope_theta, scaling)
    y_ref, _ = reference_for(
        layer,
        cfg,
        x,
        pos,
        seg,
        sm_scale=expected,
        inv_freq=inv_freq,
        attention_factor=attention_factor,
    )
    chex.assert_trees_all_close(y, y_ref.astype(np.float32), atol=1e-5, rtol=1e-5)


def test_softmax_scale_without_mscale_all_dim():
    assert mla_softmax_scale(192) == 192**-0.5
    yarn_no_all_dim = dict(type="yarn", factor=4.0, original_max_position_embeddings=16)
    assert mla_softmax_scale(192, yarn_no_all_dim) == 192**-0.5


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("kv_lora_rank", None, "kv_lora_rank"),
        ("kv_lora_rank", 0, "kv_lora_rank"),
        ("qk_nope_head_dim", -1, "qk_nope_head_dim"),
        ("qk_rope_head_dim", 5, "qk_rope_head_dim"),
        ("v_head_dim", 2.5, "v_head_dim"),
        ("q_lora_rank", 0, "q_lora_rank"),
        ("absorb", "yes", "absorb"),
    ],
)
def test_bad_mla_config_raises(field, value, match):
    cfg = make_cfg(**{field: value})
    with pytest.raises(ValueError, match=match):
        MLAttention(cfg, rngs=nnx.Rngs(params=0))


def test_bad_config_and_inputs_raise():
    cfg = make_cfg()
    cfg.mla = None
    with pytest.raises(ValueError, match="model.mla"):
        MLAttention(cfg, rngs=nnx.Rngs(params=0))
    cfg = make_cfg()
    cfg.mla = ml_collections.ConfigDict({k: v for k, v in cfg.mla.items() if k != "v_head_dim"})
    with pytest.raises(ValueError, match="v_head_dim"):
        MLAttention(cfg, rngs=nnx.Rngs(params=0))
    with pytest.raises(ValueError, match="layer_kind"):
        MLAttention(make_cfg(), rngs=nnx.Rngs(params=0), layer_kind="chunked")
    with pytest.raises(ValueError, match="sliding_window"):
        MLAttention(make_cfg(), rngs=nnx.Rngs(params=0), layer_kind="local")

    cfg = make_cfg()
    layer = MLAttention(cfg, rngs=nnx.Rngs(params=0))
    x, pos, seg = inputs(cfg)
    with pytest.raises(ValueError, match="cache"):
        layer(x, positions=pos, cache={})
    with pytest.raises(ValueError, match="positions"):
        layer(x, positions=pos[:, :3])
    with pytest.raises(ValueError, match="segment_ids"):
        layer(x, positions=pos, segment_ids=seg[:, :3])
    with pytest.raises(ValueError, match="d_model"):
        layer(x[..., :5], positions=pos)
