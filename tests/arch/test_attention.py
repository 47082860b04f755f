"""The Attention module against a numpy re-implementation that uses the module's weights.

The numpy model below is written from the papers: projections, QK-norm (RMSNorm per
head, or over all heads jointly as in OLMo 2), RoPE as complex rotation (rotate-half
pairing), K/V heads repeated for GQA/MQA, masks decided pair by pair in Python, soft-cap
cap*tanh(s/cap), sinks as an extra exp(sink) term in the denominator, output projection.
"""
import math

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arch.attention import Attention, layer_kind
from configs.base import model_defaults


def small_cfg(**overrides):
    cfg = model_defaults()
    cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim = 16, 4, 2, 8
    cfg.attention_impl = "reference"
    cfg.init_std = 0.3  # large enough that softmax is far from uniform
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def np_rms(x, w, eps, unit_offset):
    g = 1.0 + w if unit_offset else w
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * g


def np_rope(x, pos, theta, fraction=1.0):
    """Rotate-half RoPE on the first d = fraction*Dh features: z_j = x_j + i x_(j+d/2),
    z_j * exp(i pos theta^(-2j/d)); the remaining features pass through."""
    d = int(x.shape[-1] * fraction)
    inv = theta ** (-np.arange(0, d, 2) / d)
    z = (x[..., : d // 2] + 1j * x[..., d // 2: d]) * np.exp(1j * pos[:, :, None, None] * inv)
    return np.concatenate([z.real, z.imag, x[..., d:]], axis=-1)


def np_linear(x, lin, n_in=1):
    w = np.asarray(lin.kernel[...], np.float64)
    y = np.tensordot(x, w, axes=(list(range(x.ndim - n_in, x.ndim)), list(range(n_in))))
    return y if lin.bias is None else y + np.asarray(lin.bias[...], np.float64)


def np_attention_module(attn, x, positions, segment_ids=None):
    """The module's forward pass, in float64 numpy, with masks from positions (per document)."""
    cfg, kind = attn.cfg, attn.kind
    x = np.asarray(x, np.float64)
    pos = np.asarray(positions)
    b, t, _ = x.shape
    h, hkv, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    seg = np.ones((b, t), int) if segment_ids is None else np.asarray(segment_ids)
    q, k, v = np_linear(x, attn.q), np_linear(x, attn.k), np_linear(x, attn.v)  # [B, T, H(kv), Dh]
    if cfg.qk_norm:
        wq, wk = (np.asarray(n.scale[...], np.float64) for n in (attn.q_norm, attn.k_norm))
        if cfg.qk_norm_per_head:
            q = np_rms(q, wq, cfg.norm_eps, cfg.rmsnorm_unit_offset)
            k = np_rms(k, wk, cfg.norm_eps, cfg.rmsnorm_unit_offset)
        else:  # OLMo 2: one RMSNorm over the concatenated heads
            q = np_rms(q.reshape(b, t, h * dh), wq, cfg.norm_eps, False).reshape(b, t, h, dh)
            k = np_rms(k.reshape(b, t, hkv * dh), wk, cfg.norm_eps, False).reshape(b, t, hkv, dh)
    if cfg.position_embedding == "rope" and kind != "nope":
        theta = (cfg.rope_local_theta or cfg.rope_theta) if kind == "local" else cfg.rope_theta
        q, k = np_rope(q, pos, theta, cfg.rope_fraction), np_rope(k, pos, theta, cfg.rope_fraction)
    k, v = np.repeat(k, h // hkv, axis=2), np.repeat(v, h // hkv, axis=2)  # GQA as MHA
    scale = (cfg.query_pre_attn_scalar or dh) ** -0.5
    sinks = None if attn.sinks is None else np.asarray(attn.sinks[...], np.float64)
    out = np.zeros((b, t, h, dh))
    for bi in range(b):
        for i in range(t):
            keys = []
            for j in range(t):
                if seg[bi, i] != seg[bi, j]:
                    continue
                rel = pos[bi, i] - pos[bi, j]
                if cfg.causal and rel < 0:
                    continue
                if kind == "local" and (rel >= cfg.sliding_window or (not cfg.causal and -rel >= cfg.sliding_window)):
                    continue
                if kind == "chunked" and pos[bi, i] // cfg.chunk_size != pos[bi, j] // cfg.chunk_size:
                    continue
                keys.append(j)
            for hi in range(h):
                s = scale * k[bi, keys, hi] @ q[bi, i, hi]
                if cfg.logit_soft_cap:
                    s = cfg.logit_soft_cap * np.tanh(s / cfg.logit_soft_cap)
                denom = np.exp(s).sum() + (0.0 if sinks is None else np.exp(sinks[hi]))
                out[bi, i, hi] = np.exp(s) @ v[bi, keys, hi] / denom
    return np_linear(out, attn.o, n_in=2)


def make(cfg, kind="global", seed=0):
    attn = Attention(cfg, rngs=nnx.Rngs(seed), layer_kind=kind)
    if attn.sinks is not None:  # sinks start at 0; make them differ per head
        attn.sinks[...] = jnp.asarray(np.linspace(-1.0, 1.5, cfg.num_heads), jnp.float32)
    for lin in (attn.q, attn.k, attn.v, attn.o):
        if lin.bias is not None:
            lin.bias[...] = jnp.asarray(np.random.default_rng(seed).standard_normal(lin.bias[...].shape) * 0.3,
                                        jnp.float32)
    return attn


@nnx.jit
def forward(attn, x, positions, segment_ids):
    return attn(x, positions=positions, segment_ids=segment_ids)


def inputs(b=2, t=8, d=16, seed=1):
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((b, t, d)), jnp.float32)
    return x, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


CASES = {
    "gqa": dict(),
    "mha": dict(num_kv_heads=4),
    "mqa": dict(num_kv_heads=1),
    "bidirectional": dict(causal=False),
    "softcap": dict(logit_soft_cap=1.0, init_std=0.6),
    "sinks": dict(attention_sinks=True),
    "qk_norm_per_head": dict(qk_norm=True, rmsnorm_unit_offset=True),
    "qk_norm_joint": dict(qk_norm=True, qk_norm_per_head=False),
    "biases_and_scalar": dict(attn_bias=True, attn_out_bias=True, query_pre_attn_scalar=32),
    "no_rope_learned_positions": dict(position_embedding="learned"),
    "partial_rope": dict(rope_fraction=0.5, rope_theta=100.0),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_module_matches_numpy(name):
    cfg = small_cfg(**CASES[name])
    attn = make(cfg)
    if cfg.qk_norm:  # non-trivial norm scales
        for n in (attn.q_norm, attn.k_norm):
            n.scale[...] = n.scale[...] + jnp.asarray(np.linspace(-0.5, 0.5, n.scale[...].shape[0]), jnp.float32)
    x, pos = inputs()
    pos = pos + 3  # rope angles at non-zero offsets
    y, aux = forward(attn, x, pos, None)
    assert aux == {}
    chex.assert_shape(y, x.shape)
    chex.assert_trees_all_close(np.asarray(y), np_attention_module(attn, x, pos), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_local_layer_uses_window_and_local_theta(causal):
    cfg = small_cfg(causal=causal, layer_pattern=("local", "global"), sliding_window=3,
                    rope_theta=1e6, rope_local_theta=1e4)
    assert [layer_kind(cfg, i) for i in range(4)] == ["local", "global", "local", "global"]
    x, pos = inputs(t=9)
    local, glob = make(cfg, "local"), make(cfg, "global")
    chex.assert_trees_all_close(np.asarray(forward(local, x, pos, None)[0]), np_attention_module(local, x, pos),
                                atol=2e-5, rtol=1e-4)
    chex.assert_trees_all_close(np.asarray(forward(glob, x, pos, None)[0]), np_attention_module(glob, x, pos),
                                atol=2e-5, rtol=1e-4)
    # Same weights, global kind: differs (the window masks something).
    glob_same = Attention(cfg, rngs=nnx.Rngs(0), layer_kind="global")
    assert float(jnp.max(jnp.abs(forward(glob_same, x, pos, None)[0] - forward(local, x, pos, None)[0]))) > 1e-4


def test_chunked_layer_attends_within_chunks():
    cfg = small_cfg(layer_pattern=("chunked",), chunk_size=3)
    attn = make(cfg, "chunked")
    x, pos = inputs(t=8)
    chex.assert_trees_all_close(np.asarray(forward(attn, x, pos, None)[0]), np_attention_module(attn, x, pos),
                                atol=2e-5, rtol=1e-4)
    # Token 3 starts a chunk: it sees only itself, so with causal masking its output is o(v(x_3)).
    lone = np_attention_module(attn, x[:, 3:4], pos[:, :1])
    chex.assert_trees_all_close(np.asarray(forward(attn, x, pos, None)[0][:, 3:4]), lone, atol=2e-5, rtol=1e-4)


def test_nope_layer_ignores_positions():
    cfg = small_cfg(layer_pattern=("global", "nope"))
    x, pos = inputs()
    nope, rope = make(cfg, "nope"), make(cfg, "global")
    assert nope.rope is None and rope.rope is not None
    stretched = pos * 3 + 5  # same order, different distances
    y0, y1 = forward(nope, x, pos, None)[0], forward(nope, x, stretched, None)[0]
    chex.assert_trees_all_close(y0, y1, atol=1e-6)
    chex.assert_trees_all_close(np.asarray(y0), np_attention_module(nope, x, pos), atol=2e-5, rtol=1e-4)
    # The RoPE layer does see the change (so the check above can fail).
    assert float(jnp.max(jnp.abs(forward(rope, x, pos, None)[0] - forward(rope, x, stretched, None)[0]))) > 1e-4


def test_rope_layer_is_shift_invariant():
    attn = make(small_cfg())
    x, pos = inputs()
    chex.assert_trees_all_close(forward(attn, x, pos, None)[0], forward(attn, x, pos + 50, None)[0], atol=1e-5)


@pytest.mark.parametrize("kind", ["global", "local", "chunked", "nope"])
def test_packed_batch_equals_documents_alone(kind):
    cfg = small_cfg(layer_pattern=(kind,), sliding_window=3, chunk_size=2)
    attn = make(cfg, kind)
    lengths = [5, 4, 2]  # + 1 padding token
    t = sum(lengths) + 1
    x, _ = inputs(b=1, t=t, seed=3)
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(1, int)])[None]
    pos = np.concatenate([np.arange(n) for n in lengths] + [np.zeros(1, int)])[None]
    packed = forward(attn, x, jnp.asarray(pos, jnp.int32), jnp.asarray(seg, jnp.int32))[0]
    start = 0
    for n in lengths:
        xd = x[:, start:start + n]
        alone = forward(attn, xd, jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (1, n)), None)[0]
        chex.assert_trees_all_close(packed[:, start:start + n], alone, atol=2e-5, rtol=1e-4)
        start += n
    real = slice(0, sum(lengths))
    want = np_attention_module(attn, x, pos, seg)
    chex.assert_trees_all_close(np.asarray(packed[:, real]), want[:, real], atol=2e-5, rtol=1e-4)
    assert not bool(jnp.any(jnp.isnan(packed)))


def test_max_logits_in_aux():
    cfg = small_cfg(track_max_logits=True, layer_pattern=("local",), sliding_window=2)
    attn = make(cfg, "local")
    x, pos = inputs()
    _, aux = forward(attn, x, pos, None)
    # Brute force: rotated q, k from the module's weights; max over kept pairs.
    xn = np.asarray(x, np.float64)
    q = np_rope(np_linear(xn, attn.q), np.asarray(pos), cfg.rope_theta)
    k = np.repeat(np_rope(np_linear(xn, attn.k), np.asarray(pos), cfg.rope_theta), 2, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(cfg.head_dim)
    i, j = np.arange(8)[:, None], np.arange(8)[None, :]
    s = np.where((j <= i) & (i - j < 2), s, -np.inf)
    chex.assert_trees_all_close(np.asarray(aux["max_logits"]), s.max(axis=(0, 2, 3)), atol=1e-5)


def test_bf16_compute():
    cfg = small_cfg(dtype="bfloat16")
    attn = make(cfg)
    x, pos = inputs()
    y, _ = forward(attn, x, pos, None)
    assert y.dtype == jnp.bfloat16
    chex.assert_trees_all_close(np.asarray(y, np.float32), np_attention_module(attn, x, pos), atol=3e-2, rtol=5e-2)


# ------------------------------------------------------------------ config errors


@pytest.mark.parametrize("overrides,match", [
    (dict(num_heads=4, num_kv_heads=3), r"model\.num_heads=4 must be divisible by model\.num_kv_heads=3"),
    (dict(layer_pattern=("global", "sparse")), r"model\.layer_pattern.*'sparse'.*global"),
    (dict(layer_pattern=("local",), sliding_window=None), r"model\.sliding_window=None"),
    (dict(layer_pattern=("local",), sliding_window=0), r"model\.sliding_window=0"),
    (dict(layer_pattern=("local",), sliding_window=512), r"model\.sliding_window=512 must not exceed model\.max_seq_len=256"),
    (dict(layer_pattern=("chunked",), chunk_size=None), r"model\.chunk_size"),
    (dict(attention_impl="flash"), r"model\.attention_impl='flash'.*reference"),
    (dict(position_embedding="alibi"), r"model\.position_embedding"),
])
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        Attention(small_cfg(**overrides), rngs=nnx.Rngs(0))


def test_unknown_layer_kind_raises():
    with pytest.raises(ValueError, match=r"layer_kind='sparse'.*global"):
        Attention(small_cfg(), rngs=nnx.Rngs(0), layer_kind="sparse")


@pytest.mark.parametrize("kind,field", [("local", "sliding_window"), ("chunked", "chunk_size")])
def test_layer_kind_argument_is_validated_like_the_pattern(kind, field):
    # A layer built as `kind` needs its window/chunk even when layer_pattern does not list
    # `kind`; otherwise "local" silently runs as global and "chunked" fails inside jnp.
    with pytest.raises(ValueError, match=rf"model\.{field}"):
        Attention(small_cfg(sliding_window=None, chunk_size=None), rngs=nnx.Rngs(0), layer_kind=kind)
