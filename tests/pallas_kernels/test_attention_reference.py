"""The plain-jnp attention reference and the `flash_attention` api, against brute force.

The brute force below loops over (batch, head, query) in numpy float64 and decides each
(query, key) pair with plain Python comparisons, straight from the mask rules in
reference.py's docstring: causal kv_pos <= q_pos; window q_pos - kv_pos < W (and
kv_pos - q_pos < W when not causal); equal segment ids. Keys sit at 0..Tk-1, queries
aligned at the end. Sinks add exp(sink) to the softmax denominator only.
"""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.flash_attention import max_logits_reference as _max_logits_reference
from pallas_kernels.flash_attention import mha_reference as _mha_reference
from pallas_kernels.flash_attention.reference import attention_mask as _attention_mask


def allowed(qp, kp, *, causal, window, qs=None, ks=None):
    if causal and kp > qp:
        return False
    if window is not None and qp - kp >= window:
        return False
    if window is not None and not causal and kp - qp >= window:
        return False
    if qs is not None and qs != ks:
        return False
    return True


def brute_force(q, k, v, *, causal=False, window=None, q_seg=None, kv_seg=None, q_pos=None, kv_pos=None,
                cap=None, scale=None, sinks=None):
    """Returns (out [B, Tq, H, Dv], lse [B, H, Tq], max_logit [H])."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    q_pos = np.broadcast_to(np.arange(tk - tq, tk), (b, tq)) if q_pos is None else np.asarray(q_pos)
    kv_pos = np.broadcast_to(np.arange(tk), (b, tk)) if kv_pos is None else np.asarray(kv_pos)
    out = np.zeros((b, tq, h, v.shape[-1]))
    lse = np.full((b, h, tq), -np.inf)
    max_logit = np.full((h,), -np.inf)
    for bi in range(b):
        for hi in range(h):
            kh = hi // (h // hkv)  # query head hi reads kv head hi // group
            for i in range(tq):
                keys = [j for j in range(tk) if allowed(
                    q_pos[bi, i], kv_pos[bi, j], causal=causal, window=window,
                    qs=None if q_seg is None else q_seg[bi, i], ks=None if kv_seg is None else kv_seg[bi, j])]
                raw = np.array([scale * q[bi, i, hi] @ k[bi, j, kh] for j in keys])
                if keys:
                    max_logit[hi] = max(max_logit[hi], raw.max())
                s = cap * np.tanh(raw / cap) if cap is not None else raw
                extra = [] if sinks is None else [float(sinks[hi])]
                if not keys and not extra:
                    continue
                allv = np.concatenate([s, extra])
                m = allv.max()
                denom = np.exp(allv - m).sum()
                if keys:
                    out[bi, i, hi] = (np.exp(s - m)[:, None] * v[bi, keys, kh]).sum(0) / denom
                lse[bi, hi, i] = m + np.log(denom)
    return out, lse, max_logit


def rand_qkv(b, tq, tk, h, hkv, d, seed=0, dtype=jnp.float32, dv=None, q_scale=1.0):
    # numpy draws: no per-shape XLA compiles for the inputs (keeps the file fast on CPU).
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, tq, h, d)) * q_scale
    k = rng.standard_normal((b, tk, hkv, d))
    v = rng.standard_normal((b, tk, hkv, dv or d))
    return tuple(jnp.asarray(a, dtype) for a in (q, k, v))


# One compile per configuration instead of one per eager op.
_STATIC = ("causal", "sliding_window", "logit_soft_cap", "sm_scale")
mha_reference = jax.jit(_mha_reference, static_argnames=_STATIC + ("return_lse",))
attention = jax.jit(flash_attention, static_argnames=_STATIC + ("impl", "block_sizes"))
attention_mask = jax.jit(_attention_mask, static_argnums=(0, 1, 2), static_argnames=("causal", "sliding_window"))
max_logits_reference = jax.jit(_max_logits_reference, static_argnames=("causal", "sliding_window", "sm_scale"))


# ------------------------------------------------------------------ masks


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 1, 3, 9])
@pytest.mark.parametrize("tq,tk", [(7, 7), (3, 7)])
def test_mask_enumerated_against_loop(causal, window, tq, tk):
    seg_q = np.array([[1, 1, 2, 2, 2, 2, 0][-tq:]])
    seg_k = np.array([[1, 1, 2, 2, 2, 2, 0]])
    mask = np.asarray(attention_mask(1, tq, tk, causal=causal, sliding_window=window,
                                     q_segment_ids=jnp.asarray(seg_q), kv_segment_ids=jnp.asarray(seg_k)))
    chex.assert_shape(mask, (1, 1, tq, tk))
    for i in range(tq):
        for j in range(tk):
            want = allowed(tk - tq + i, j, causal=causal, window=window, qs=seg_q[0, i], ks=seg_k[0, j])
            assert mask[0, 0, i, j] == want, (i, j)


def test_window_counts_self_and_is_symmetric_when_not_causal():
    m = np.asarray(attention_mask(1, 8, 8, causal=False, sliding_window=3))[0, 0]
    chex.assert_trees_all_equal(m, m.T)
    assert m[4].tolist() == [False, False, True, True, True, True, True, False]
    mc = np.asarray(attention_mask(1, 8, 8, causal=True, sliding_window=3))[0, 0]
    assert mc[4].tolist() == [False, False, True, True, True, False, False, False]


# ------------------------------------------------------------------ values


CASES = {
    "mha_bidir": dict(h=4, hkv=4),
    "mha_causal": dict(h=4, hkv=4, causal=True),
    "gqa_causal": dict(h=4, hkv=2, causal=True),
    "mqa_causal": dict(h=4, hkv=1, causal=True),
    "window_causal": dict(h=2, hkv=1, causal=True, window=3),
    "window_bidir": dict(h=2, hkv=2, window=2),
    "softcap": dict(h=2, hkv=1, causal=True, cap=2.0, scale=1.0),
    "sinks": dict(h=4, hkv=2, causal=True, sinks=True),
    "segments": dict(h=2, hkv=1, causal=True, segments=True),
    "everything": dict(h=4, hkv=2, causal=True, window=4, cap=5.0, sinks=True, segments=True, scale=0.3),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_matches_brute_force(name):
    c = CASES[name]
    b, t, d = 2, 9, 8
    q, k, v = rand_qkv(b, t, t, c["h"], c["hkv"], d, dv=6, q_scale=2.0)  # larger logits: cap and sinks act
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 3, 3], [1, 1, 1, 1, 1, 1, 1, 0, 0]]) if c.get("segments") else None
    sinks = jnp.array([0.5, -1.0, 2.0, 0.0][: c["h"]]) if c.get("sinks") else None
    kw = dict(causal=c.get("causal", False), sliding_window=c.get("window"), logit_soft_cap=c.get("cap"),
              sm_scale=c.get("scale"), sinks=sinks, segment_ids=seg)
    o, lse = mha_reference(q, k, v, return_lse=True, **kw)
    want_o, want_lse, _ = brute_force(q, k, v, causal=kw["causal"], window=kw["sliding_window"], q_seg=seg,
                                      kv_seg=seg, cap=kw["logit_soft_cap"], scale=kw["sm_scale"], sinks=sinks)
    chex.assert_shape(o, (b, t, c["h"], 6))
    chex.assert_trees_all_close(np.asarray(o), want_o, atol=2e-5, rtol=1e-5)
    chex.assert_trees_all_close(np.asarray(lse), want_lse, atol=2e-5, rtol=1e-5)
    # The api's default "auto" (the reference on CPU) gives the same.
    chex.assert_trees_all_close(np.asarray(attention(q, k, v, **kw)), want_o, atol=2e-5, rtol=1e-5)


def test_gqa_equals_mha_with_repeated_kv():
    q, k, v = rand_qkv(2, 6, 6, 6, 2, 4, seed=3)
    o = mha_reference(q, k, v, causal=True, sliding_window=4)
    # Query head h uses kv head h // (H / Hkv): repeat each kv head 3 times, consecutively.
    k_rep, v_rep = (jnp.asarray(np.repeat(np.asarray(a), 3, axis=2)) for a in (k, v))
    o_mha = mha_reference(q, k_rep, v_rep, causal=True, sliding_window=4)
    want, _, _ = brute_force(q, k_rep, v_rep, causal=True, window=4)
    chex.assert_trees_all_close(o, o_mha, atol=1e-6)
    chex.assert_trees_all_close(np.asarray(o), want, atol=2e-5)


def test_mqa_every_head_reads_the_one_kv_head():
    q, k, v = rand_qkv(1, 5, 5, 3, 1, 4, seed=4)
    o = mha_reference(q, k, v, causal=True)
    for hi in range(3):
        want, _, _ = brute_force(q[:, :, hi:hi + 1], k, v, causal=True)
        chex.assert_trees_all_close(np.asarray(o[:, :, hi:hi + 1]), want, atol=2e-5)


def test_causal_differs_from_bidirectional_only_below_the_last_row():
    q, k, v = rand_qkv(1, 6, 6, 2, 2, 4, seed=5)
    oc, ob = mha_reference(q, k, v, causal=True), mha_reference(q, k, v, causal=False)
    chex.assert_trees_all_close(oc[:, -1], ob[:, -1], atol=1e-6)  # the last query sees everything
    assert float(jnp.max(jnp.abs(oc[:, 0] - ob[:, 0]))) > 1e-3
    chex.assert_trees_all_close(oc[:, 0], jnp.broadcast_to(v[:, 0], oc[:, 0].shape), atol=1e-6)  # first sees only key 0


def test_q_shorter_than_kv_is_aligned_at_the_end():
    q, k, v = rand_qkv(2, 8, 8, 4, 2, 8, seed=6)
    q_tail = jnp.asarray(np.asarray(q)[:, -3:])
    full = mha_reference(q, k, v, causal=True, sliding_window=5)
    tail = mha_reference(q_tail, k, v, causal=True, sliding_window=5)
    chex.assert_trees_all_close(tail, full[:, -3:], atol=1e-6)
    want, _, _ = brute_force(q_tail, k, v, causal=True, window=5)
    chex.assert_trees_all_close(np.asarray(tail), want, atol=2e-5)
    # Explicit positions give the same thing.
    qp = jnp.broadcast_to(jnp.arange(5, 8), (2, 3))
    kp = jnp.broadcast_to(jnp.arange(8), (2, 8))
    chex.assert_trees_all_close(mha_reference(q_tail, k, v, causal=True, sliding_window=5,
                                              q_positions=qp, kv_positions=kp), tail, atol=1e-6)


def test_explicit_positions_and_segment_pair():
    q, k, v = rand_qkv(1, 4, 6, 2, 1, 4, seed=7)
    qp, kp = jnp.array([[10, 3, 7, 12]]), jnp.array([[0, 3, 6, 9, 12, 15]])
    qs, ks = jnp.array([[1, 1, 2, 2]]), jnp.array([[1, 2, 2, 1, 2, 1]])
    o = mha_reference(q, k, v, causal=True, sliding_window=8, q_positions=qp, kv_positions=kp,
                      segment_ids=(qs, ks))
    want, _, _ = brute_force(q, k, v, causal=True, window=8, q_pos=qp, kv_pos=kp, q_seg=qs, kv_seg=ks)
    chex.assert_trees_all_close(np.asarray(o), want, atol=2e-5)


def test_sinks_formula_in_numpy():
    # One query, three keys, no mask: softmax with exp(sink) added to the denominator.
    q, k, v = rand_qkv(1, 1, 3, 1, 1, 4, seed=8)
    sink = 0.7
    s = np.einsum("bqhd,bkhd->k", np.asarray(q, np.float64), np.asarray(k, np.float64)) / 2.0  # 1/sqrt(4)
    p = np.exp(s) / (np.exp(s).sum() + np.exp(sink))
    want = p @ np.asarray(v[0, :, 0], np.float64)
    o = mha_reference(q, k, v, sinks=jnp.array([sink]))
    chex.assert_trees_all_close(np.asarray(o[0, 0, 0]), want, atol=1e-6)
    assert p.sum() < 1.0  # the sink takes some mass: outputs shrink toward 0


def test_softcap_formula():
    q, k, v = rand_qkv(1, 1, 4, 1, 1, 2, seed=9, q_scale=10.0)
    cap = 1.5
    s = np.einsum("bqhd,bkhd->k", np.asarray(q, np.float64), np.asarray(k, np.float64))  # sm_scale = 1
    s = cap * np.tanh(s / cap)
    p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
    o = mha_reference(q, k, v, logit_soft_cap=cap, sm_scale=1.0)
    chex.assert_trees_all_close(np.asarray(o[0, 0, 0]), p @ np.asarray(v[0, :, 0], np.float64), atol=1e-6)


@pytest.mark.parametrize("with_sinks", [False, True])
def test_fully_masked_row_is_zero_not_nan(with_sinks):
    q, k, v = rand_qkv(1, 3, 4, 2, 1, 4, seed=10)
    qs, ks = jnp.array([[1, 3, 2]]), jnp.array([[1, 1, 2, 2]])  # query 1 (segment 3) has no key
    sinks = jnp.array([0.3, -0.2]) if with_sinks else None
    o, lse = mha_reference(q, k, v, segment_ids=(qs, ks), sinks=sinks, return_lse=True)
    assert not bool(jnp.any(jnp.isnan(o)))
    chex.assert_trees_all_equal(o[0, 1], jnp.zeros_like(o[0, 1]))
    want, want_lse, _ = brute_force(q, k, v, q_seg=qs, kv_seg=ks, sinks=sinks)
    chex.assert_trees_all_close(np.asarray(o), want, atol=2e-5)
    if with_sinks:  # the sink alone is in the denominator
        chex.assert_trees_all_close(np.asarray(lse), want_lse, atol=1e-5)
    else:
        assert bool(jnp.all(jnp.isneginf(lse[0, :, 1])))
    g = jax.grad(lambda q, k, v: jnp.sum(mha_reference(q, k, v, segment_ids=(qs, ks), sinks=sinks)), (0, 1, 2))(q, k, v)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in g)
    chex.assert_trees_all_equal(g[0][0, 1], jnp.zeros_like(g[0][0, 1]))


def test_bf16_inputs_softmax_in_f32():
    q, k, v = rand_qkv(1, 8, 8, 2, 1, 16, seed=11, dtype=jnp.bfloat16)
    o = mha_reference(q, k, v, causal=True, logit_soft_cap=10.0)
    assert o.dtype == jnp.bfloat16
    want, _, _ = brute_force(q, k, v, causal=True, cap=10.0)  # float64 of the bf16 values
    chex.assert_trees_all_close(np.asarray(o, np.float32), want, atol=3e-2, rtol=3e-2)


def test_reference_gradients():
    q, k, v = rand_qkv(1, 5, 5, 2, 1, 4, seed=12)
    sinks = jnp.array([0.2, -0.4])
    seg = jnp.array([[1, 1, 1, 2, 2]])
    f = jax.jit(lambda q, k, v, sinks: mha_reference(q, k, v, causal=True, sliding_window=3, logit_soft_cap=3.0,
                                                     segment_ids=seg, sinks=sinks))
    check_grads(f, (q, k, v, sinks), order=1, modes=("rev",))


def test_max_logits_reference_matches_brute_force():
    q, k, _ = rand_qkv(2, 7, 7, 4, 2, 8, seed=13)
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 1]])
    got = max_logits_reference(q, k, causal=True, sliding_window=3, segment_ids=seg, sm_scale=0.5)
    _, _, want = brute_force(q, k, k, causal=True, window=3, q_seg=seg, kv_seg=seg, scale=0.5)
    chex.assert_shape(got, (4,))
    chex.assert_trees_all_close(np.asarray(got), want, atol=1e-5)
    # Masked pairs are excluded: the unmasked maximum is larger for some head.
    assert bool(jnp.any(max_logits_reference(q, k, sm_scale=0.5) > got + 1e-3))


@pytest.mark.parametrize("causal,window", [(True, None), (True, 3), (False, 3)])
def test_xla_backend_window_translation(causal, window):
    # jax.nn.dot_product_attention is an independent implementation of the same masks.
    q, k, v = rand_qkv(1, 8, 8, 4, 2, 8, seed=14)
    o = attention(q, k, v, causal=causal, sliding_window=window, impl="xla")
    want, _, _ = brute_force(q, k, v, causal=causal, window=window)
    chex.assert_trees_all_close(np.asarray(o), want, atol=2e-5)


@pytest.mark.parametrize("impl", ["xla", "cudnn"])
@pytest.mark.parametrize("feature,kw", [
    ("segment_ids", dict(segment_ids=jnp.ones((1, 8), jnp.int32))),
    ("logit_soft_cap", dict(logit_soft_cap=20.0)),
    ("sinks", dict(sinks=jnp.zeros((4,)))),
])
def test_dot_product_attention_impls_refuse_what_they_lack_by_name(impl, feature, kw):
    # Asked for by name, an impl that lacks a feature is a ValueError naming both and the
    # impls that have it (never a silent fallback); "auto" takes every feature.
    q, k, v = rand_qkv(1, 8, 8, 4, 2, 8, seed=15)
    with pytest.raises(ValueError, match=rf"impl='{impl}' cannot serve .*{feature}.*pallas_gpu"):
        attention(q, k, v, causal=True, impl=impl, **kw)
    attention(q, k, v, causal=True, impl="auto", **kw)


# ------------------------------------------------------------------ api validation


def test_api_rejects_bad_inputs():
    q, k, v = (np.asarray(a) for a in rand_qkv(2, 4, 4, 4, 2, 8))
    cases = [
        (dict(q=q[0]), "rank 4"),
        (dict(k=k[:1], v=v[:1]), "batch sizes differ"),
        (dict(v=v[:, :3]), "k and v must agree"),
        (dict(k=k[..., :4]), "head dims differ"),
        (dict(k=k[:, :, :1].repeat(3, axis=2), v=v[:, :, :1].repeat(3, axis=2)), "divisible"),
        (dict(q=q.astype(np.int32)), "dtype"),
        (dict(segment_ids=jnp.ones((2, 5), jnp.int32)), "segment_ids"),
        (dict(segment_ids=jnp.ones((4,), jnp.int32)), "segment_ids"),
        (dict(sinks=jnp.zeros((2,))), "sinks"),
        (dict(impl="flash"), "impl"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(q_positions=jnp.zeros((2, 4), jnp.int32)), "together"),
        (dict(q_positions=jnp.zeros((2, 3), jnp.int32), kv_positions=jnp.zeros((2, 4), jnp.int32)), "positions"),
    ]
    for override, match in cases:
        kw = dict(q=q, k=k, v=v, causal=True)
        kw.update(override)
        kw = {n: jnp.asarray(a) if isinstance(a, np.ndarray) else a for n, a in kw.items()}
        with pytest.raises(ValueError, match=match):
            flash_attention(**kw)


def test_api_segment_ids_must_be_a_pair_when_lengths_differ():
    q, k, v = rand_qkv(1, 3, 5, 2, 1, 4)
    with pytest.raises(ValueError, match="segment_ids"):
        flash_attention(q, k, v, segment_ids=jnp.ones((1, 5), jnp.int32))
    o = attention(q, k, v, segment_ids=(jnp.ones((1, 3), jnp.int32), jnp.ones((1, 5), jnp.int32)))
    want, _, _ = brute_force(q, k, v)
    chex.assert_trees_all_close(np.asarray(o), want, atol=2e-5)
