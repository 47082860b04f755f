"""Attention dropout: the hash mask, the reference, and the Pallas kernels against it.

The reference (reference.mha_reference) is checked against an independent float64 numpy
computation built from `dropout.keep_mask`; the Triton kernel (interpret mode on CPU,
compiled under `JAX_PLATFORMS=cuda`) is checked against the reference with the same seed,
outputs and dq/dk/dv through `jax.vjp`, in the split and the fused backward; the Pallas
TPU kernel likewise, in TPU interpret mode.
"""
from __future__ import annotations

import dataclasses
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_flash_attention_gpu import FUSED, SMALL, _outputs_and_grads
from test_flash_attention_gpu import _inputs as gpu_inputs

from pallas_kernels.flash_attention import DROPOUT_IMPLS, api, dropout, gpu, reference, tpu

# SMALL/FUSED are the GPU tests' small tiles: T=40 spans several blocks of each kernel and
# is padded in all of them.
ON_GPU = jax.default_backend() == "gpu"
RATE = 0.3


def _inputs(seed, b=2, tq=40, tk=40, h=4, hkv=2, d=16, dtype=jnp.float32):
    return gpu_inputs(seed, b, tq, tk, h, hkv, d, d, dtype)


def _segments(b, t):
    """Two packed documents and a padded tail in row 0, one document in the others."""
    row0 = np.r_[np.ones(17), 2 * np.ones(t - 22), np.zeros(5)]
    return jnp.asarray(np.stack([row0] + [np.ones(t)] * (b - 1)), jnp.int32)


# ----------------------------------------------------------------------------- the mask
def test_keep_fraction_and_seeds():
    """About 1 - rate of a large grid is kept; other seeds, batch rows and heads differ."""
    b, h, t = 2, 4, 256
    iota = lambda n: jnp.arange(n, dtype=jnp.int32)
    grid = (iota(b)[:, None, None, None], iota(h)[None, :, None, None],
            iota(t)[None, None, :, None], iota(t)[None, None, None, :])
    for rate in (0.1, 0.5):
        keep = np.asarray(dropout.keep_mask(jnp.uint32(7), *grid, rate=rate))
        assert keep.shape == (b, h, t, t)
        assert abs(keep.mean() - (1 - rate)) < 0.01, (rate, keep.mean())
        # Each (batch, head) slice and each query row on its own is balanced too.
        np.testing.assert_allclose(keep.mean(axis=(2, 3)), 1 - rate, atol=0.02)
        other = np.asarray(dropout.keep_mask(jnp.uint32(8), *grid, rate=rate))
        assert abs((keep != other).mean() - 2 * rate * (1 - rate)) < 0.01
        assert (keep[0] != keep[1]).mean() > 0.1 and (keep[:, 0] != keep[:, 1]).mean() > 0.1
    # A Python int, an int32 and a uint32 array with the same bits give the same mask.
    big = 0xDEADBEEF
    ref = dropout.keep_mask(jnp.uint32(big), *grid, rate=0.2)
    for seed in (big, jnp.asarray(big - (1 << 32), jnp.int32)):
        np.testing.assert_array_equal(dropout.keep_mask(seed, *grid, rate=0.2), ref)


# ----------------------------------------------------------------------------- reference
def _numpy_attention(q, k, v, *, causal, segment_ids, rate, seed):
    """float64 numpy: softmax over the masked logits, dropout from keep_mask, then P @ V."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    kh = np.repeat(k, h // hkv, axis=2)  # query head i reads kv head i // group
    vh = np.repeat(v, h // hkv, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, kh) / np.sqrt(d)
    allowed = np.ones((b, 1, tq, tk), bool)
    if causal:
        allowed &= np.tril(np.ones((tq, tk), bool))[None, None]
    if segment_ids is not None:
        seg = np.asarray(segment_ids)
        allowed &= (seg[:, :, None] == seg[:, None, :])[:, None]
    s = np.where(allowed, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    denom = e.sum(axis=-1, keepdims=True)
    p = e / np.where(denom == 0, 1.0, denom)
    bi, hi, qi, ki = np.ix_(*(np.arange(n, dtype=np.int32) for n in (b, h, tq, tk)))
    keep = np.asarray(dropout.keep_mask(seed, bi, hi, qi, ki, rate=rate))
    p = np.where(keep, p / (1 - rate), 0.0)
    return np.einsum("bhqk,bkhd->bqhd", p, vh)


@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_numpy(causal):
    q, k, v, _, _ = _inputs(1)
    seg = _segments(2, 40) if causal else None
    seed = jnp.uint32(12345)
    o = api.flash_attention(q, k, v, causal=causal, segment_ids=seg, dropout_rate=RATE,
                            dropout_seed=seed, impl="reference")
    want = _numpy_attention(q, k, v, causal=causal, segment_ids=seg, rate=RATE, seed=seed)
    np.testing.assert_allclose(np.asarray(o), want, atol=2e-5, rtol=2e-5)
    undropped = reference.mha_reference(q, k, v, causal=causal, segment_ids=seg)
    assert np.abs(np.asarray(o) - np.asarray(undropped)).max() > 0.1  # dropout did something


def test_reference_lse_is_undropped_and_auto_on_cpu_is_reference():
    q, k, v, _, _ = _inputs(2)
    o, lse = reference.mha_reference(q, k, v, causal=True, return_lse=True,
                                     dropout_rate=RATE, dropout_seed=3)
    _, lse_plain = reference.mha_reference(q, k, v, causal=True, return_lse=True)
    np.testing.assert_array_equal(lse, lse_plain)
    if jax.default_backend() == "cpu":
        o_auto = api.flash_attention(q, k, v, causal=True, dropout_rate=RATE, dropout_seed=3)
        np.testing.assert_array_equal(o_auto, o)


def test_rate_zero_is_exactly_no_dropout():
    q, k, v, _, _ = _inputs(3)
    plain = reference.mha_reference(q, k, v, causal=True)
    for seed in (None, 5):
        o = api.flash_attention(q, k, v, causal=True, dropout_rate=0.0, dropout_seed=seed,
                                impl="reference")
        np.testing.assert_array_equal(o, plain)
    # At rate 0 the backends never see the dropout arguments, so impls without dropout run.
    o_xla = api.flash_attention(q, k, v, causal=True, dropout_rate=0.0, dropout_seed=5, impl="xla")
    chex.assert_trees_all_close(o_xla, plain, atol=1e-5, rtol=1e-5)
    o_gpu = gpu.flash_attention(q, k, v, causal=True, dropout_rate=0.0, block_sizes=SMALL)
    np.testing.assert_array_equal(
        o_gpu, gpu.flash_attention(q, k, v, causal=True, block_sizes=SMALL))


# ----------------------------------------------------------------------------- the kernel
def _check_kernel(kw, *, blocks, dtype=jnp.float32, tq=40, seed=0, jit=False,
                  module=gpu):
    q, k, v, do, dlse = _inputs(seed, tq=tq, dtype=dtype)
    dseed = kw.pop("dropout_seed")

    def kernel(seed_value, q, k, v):
        return module.flash_attention_with_lse(q, k, v, block_sizes=blocks, dropout_rate=RATE,
                                               dropout_seed=seed_value, **kw)

    def run_kernel(q, k, v):
        fn = jax.jit(kernel) if jit else kernel
        return fn(dseed, q, k, v)

    ref = functools.partial(reference.mha_reference, return_lse=True, dropout_rate=RATE,
                            dropout_seed=dseed, **kw)
    o, lse, grads = _outputs_and_grads(run_kernel, q, k, v, do, dlse)
    f32 = lambda x: x.astype(jnp.float32)
    o_ref, lse_ref, grads_ref = _outputs_and_grads(ref, f32(q), f32(k), f32(v), do, dlse)
    assert o.dtype == q.dtype
    if dtype == jnp.float32:
        atol, rtol = (2e-5, 1e-5) if not ON_GPU else (1e-4, 1e-4)
    else:
        atol, rtol = 3e-2, 3e-2
    finite = np.isfinite(lse_ref)
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    chex.assert_trees_all_close(f32(o), o_ref, atol=atol, rtol=rtol)
    chex.assert_trees_all_close(jnp.where(finite, lse, 0.0), jnp.where(finite, lse_ref, 0.0),
                                atol=atol, rtol=rtol)
    for name, g, g_ref in zip("qkv", grads, grads_ref, strict=True):
        scale = max(1.0, float(jnp.abs(g_ref).max()))
        chex.assert_trees_all_close(f32(g), g_ref, atol=atol * scale, rtol=rtol,
                                    custom_message=f"d{name}")


@pytest.mark.parametrize("blocks", [SMALL, FUSED], ids=["split", "fused"])
def test_kernel_causal_segments_gqa_f32(blocks):
    """Causal + packed segments + GQA (4 query heads on 2 kv heads), T=40 padded to 64."""
    _check_kernel(dict(causal=True, segment_ids=_segments(2, 40),
                       dropout_seed=jnp.uint32(0xDEADBEEF)), blocks=blocks, jit=True)


def test_kernel_shorter_queries_sinks_softcap_bf16():
    """bf16, 24 queries on 40 keys, soft-cap and sinks, through api.flash_attention."""
    sinks = jnp.array([0.5, -1.0, 0.0, 2.0], jnp.float32)
    _check_kernel(dict(logit_soft_cap=5.0, sinks=sinks, dropout_seed=77), blocks=SMALL,
                  dtype=jnp.bfloat16, tq=24, seed=4)


def test_tpu_kernel_causal_segments_gqa_sinks_f32():
    """The Pallas TPU kernel (interpret mode off TPU); backward tiles differ from forward's."""
    blocks = tpu.BlockSizes(block_q=16, block_kv=16, block_q_bwd=8, block_kv_bwd=32)
    _check_kernel(dict(causal=True, segment_ids=_segments(2, 40),
                       sinks=jnp.array([0.5, -1.0, 0.0, 2.0], jnp.float32),
                       dropout_seed=jnp.uint32(0xDEADBEEF)), blocks=blocks, module=tpu)


def test_api_pallas_gpu_matches_reference():
    q, k, v, _, _ = _inputs(5)
    kw = dict(causal=True, dropout_rate=0.1, dropout_seed=jnp.int32(-9))
    o = api.flash_attention(q, k, v, impl="pallas_gpu", block_sizes=SMALL, **kw)
    o_ref = api.flash_attention(q, k, v, impl="reference", **kw)
    chex.assert_trees_all_close(o, o_ref, atol=2e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, "0.1", True])
def test_bad_rate_raises(rate):
    q, k, v, _, _ = _inputs(0, b=1, tq=8, tk=8)
    with pytest.raises(ValueError, match="dropout_rate"):
        api.flash_attention(q, k, v, dropout_rate=rate, dropout_seed=1, impl="reference")


def test_bad_seed_raises():
    q, k, v, _, _ = _inputs(0, b=1, tq=8, tk=8)
    with pytest.raises(ValueError, match="dropout_seed"):
        api.flash_attention(q, k, v, dropout_rate=0.1, impl="reference")
    with pytest.raises(ValueError, match="dropout_seed"):
        api.flash_attention(q, k, v, dropout_rate=0.1, dropout_seed=1.5, impl="reference")
    with pytest.raises(ValueError, match="dropout_seed"):
        api.flash_attention(q, k, v, dropout_rate=0.1, dropout_seed=jnp.zeros(2, jnp.int32),
                            impl="reference")
    with pytest.raises(ValueError, match="dropout_seed"):
        gpu.flash_attention(q, k, v, dropout_rate=0.1, block_sizes=SMALL)


NO_DROPOUT = [impl for impl in api.IMPLS if impl not in DROPOUT_IMPLS]


@pytest.mark.parametrize("impl", NO_DROPOUT)
def test_impls_without_dropout_raise(impl):
    assert {"cudnn", "xla", "ring"} <= set(NO_DROPOUT)
    q, k, v, _, _ = _inputs(0, b=1, tq=8, tk=8)
    with pytest.raises(ValueError, match=rf"impl='{impl}'.*{re.escape(str(DROPOUT_IMPLS))}"):
        api.flash_attention(q, k, v, dropout_rate=0.1, dropout_seed=1, impl=impl)


def test_hopper_kernels_refuse_dropout():
    q, k, v, _, _ = _inputs(0, b=1, tq=8, tk=8)
    with pytest.raises(ValueError, match="dropout_rate"):
        gpu.flash_attention(q, k, v, dropout_rate=0.1, dropout_seed=1,
                            block_sizes=dataclasses.replace(SMALL, forward="hopper"))
