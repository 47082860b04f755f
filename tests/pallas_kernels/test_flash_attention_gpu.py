"""The Pallas GPU flash-attention kernel against reference.mha_reference.

On CPU the kernel runs in Pallas interpret mode (chosen automatically); on a GPU
(`JAX_PLATFORMS=cuda`) the same tests run the compiled Triton kernel. Outputs, the
log-sum-exp and dq/dk/dv (through `jax.vjp`, with cotangents on both outputs) are
compared with the plain-jnp reference. Interpret mode compiles slowly, so each fast
case packs several features together; the full grid is marked slow.
"""
from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from pallas_kernels.flash_attention import (
    api,
    gpu,
    gpu_hopper,
    gpu_hopper_bwd,
    gpu_tiling,
    reference,
)

# Small tiles so that short test sequences still span several blocks in every kernel.
SMALL = gpu.BlockSizes(block_q=16, block_k=16, block_q_dkv=16, block_kv_dkv=32,
                       block_q_dq=32, block_kv_dq=16, num_warps=4, num_warps_bwd=4)
FUSED = dataclasses.replace(SMALL, backward="fused")  # dq by atomic adds in the dk/dv kernel
BACKWARDS = pytest.mark.parametrize("blocks", [SMALL, FUSED], ids=["split", "fused"])
ON_GPU = jax.default_backend() == "gpu"


def _inputs(seed, b, tq, tk, h, hkv, d, dv, dtype):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (b, tq, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, tk, hkv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, tk, hkv, dv), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (b, tq, h, dv), jnp.float32)
    dlse = jax.random.normal(ks[4], (b, h, tq), jnp.float32)
    return q, k, v, do, dlse


def _outputs_and_grads(fn, q, k, v, do, dlse):
    """(o, lse) and the vjp of (o, lse) against (do, dlse); -inf lse rows carry no cotangent."""
    (o, lse), vjp = jax.vjp(fn, q, k, v)
    dlse = jnp.where(jnp.isfinite(lse), dlse, 0.0)
    return o, lse, vjp((do.astype(o.dtype), dlse))


def _check(kw, *, b=1, tq=40, tk=40, h=4, hkv=2, d=32, dv=None, dtype=jnp.float32, seed=0,
           block_sizes=SMALL):
    dv = d if dv is None else dv
    q, k, v, do, dlse = _inputs(seed, b, tq, tk, h, hkv, d, dv, dtype)
    kernel = functools.partial(gpu.flash_attention_with_lse, block_sizes=block_sizes, **kw)
    ref = functools.partial(reference.mha_reference, return_lse=True, **kw)
    o, lse, grads = _outputs_and_grads(kernel, q, k, v, do, dlse)
    # The reference runs in f32 on the same (possibly bf16-rounded) inputs.
    f32 = lambda x: x.astype(jnp.float32)
    o_ref, lse_ref, grads_ref = _outputs_and_grads(ref, f32(q), f32(k), f32(v), do, dlse)

    chex.assert_shape(o, (b, tq, h, dv))
    chex.assert_shape(lse, (b, h, tq))
    assert o.dtype == q.dtype
    assert all(g.dtype == x.dtype for g, x in zip(grads, (q, k, v), strict=True))
    if dtype == jnp.float32:
        # On GPU f32 dots run in full IEEE precision, only the summation order differs.
        atol, rtol = (2e-5, 1e-5) if not ON_GPU else (1e-4, 1e-4)
    else:
        atol, rtol = 2e-2, 2e-2
    finite = jnp.isfinite(lse_ref)
    np.testing.assert_array_equal(np.isfinite(lse), np.asarray(finite))
    chex.assert_trees_all_close(f32(o), o_ref, atol=atol, rtol=rtol)
    chex.assert_trees_all_close(jnp.where(finite, lse, 0.0), jnp.where(finite, lse_ref, 0.0),
                                atol=atol, rtol=rtol)
    for name, g, g_ref in zip("qkv", grads, grads_ref, strict=True):
        scale = max(1.0, float(jnp.max(jnp.abs(g_ref))))
        assert bool(jnp.all(jnp.isfinite(f32(g)))), f"d{name} has non-finite values"
        chex.assert_trees_all_close(f32(g) / scale, g_ref / scale, atol=atol, rtol=rtol,
                                    custom_message=f"d{name}")
    return o


# ----------------------------------------------------------------------------- fast cases
@BACKWARDS
def test_noncausal_gqa_f32(blocks):
    # No mask at all and whole blocks: the kernels' single unmasked loop. GQA 2:1.
    _check({}, tq=32, tk=64, block_sizes=blocks)


@BACKWARDS
def test_causal_segments_softcap_shorter_queries_f32(blocks):
    # Causal aligned at the end with q_len != kv_len, GQA 4:1, soft-cap, packed
    # documents with padding (0), and a query segment (7) with no key: fully masked rows.
    tq, tk = 24, 40
    kv_seg = jnp.array([[1] * 12 + [2] * 20 + [0] * 8, [3] * 40])
    q_seg = jnp.array([[2] * 10 + [7] * 6 + [0] * 8, [3] * 20 + [7] * 4])
    o = _check(dict(causal=True, logit_soft_cap=5.0, segment_ids=(q_seg, kv_seg)),
               b=2, tq=tq, tk=tk, h=4, hkv=1, block_sizes=blocks)
    chex.assert_trees_all_equal(o[0, 10:16], jnp.zeros_like(o[0, 10:16]))


@BACKWARDS
def test_window_positions_gqa8_head_dim_192_bf16(blocks):
    # Striped layout as ring attention sees it (shard r of 2 holds tokens r, r+2, ...):
    # causal sliding window on those global positions, GQA 8:1, qk head dim 192 with
    # v head dim 128 (DeepSeek), bf16, length 48 padded to whole blocks.
    t = 48
    q_pos = (2 * jnp.arange(t, dtype=jnp.int32) + 1)[None]
    kv_pos = (2 * jnp.arange(t, dtype=jnp.int32))[None]
    _check(dict(causal=True, sliding_window=9, q_positions=q_pos, kv_positions=kv_pos),
           tq=t, tk=t, h=8, hkv=1, d=192, dv=128, dtype=jnp.bfloat16, block_sizes=blocks)


@BACKWARDS
def test_sinks_causal_through_api_f32(blocks):
    # Attention sinks (gpt-oss), dispatched through api.flash_attention(impl="pallas_gpu");
    # gradients with respect to the sinks too. Length 40 is padded inside.
    q, k, v, do, _ = _inputs(3, 1, 40, 40, 4, 2, 32, 32, jnp.float32)
    sinks = jnp.array([0.5, -1.0, 2.0, 0.0])
    kernel = lambda q, k, v, s: api.flash_attention(q, k, v, causal=True, sinks=s,
                                                    impl="pallas_gpu", block_sizes=blocks)
    ref = lambda q, k, v, s: reference.mha_reference(q, k, v, causal=True, sinks=s)
    out, vjp = jax.vjp(kernel, q, k, v, sinks)
    out_ref, vjp_ref = jax.vjp(ref, q, k, v, sinks)
    tol = 2e-5 if not ON_GPU else 1e-4
    chex.assert_trees_all_close(out, out_ref, atol=tol, rtol=tol)
    chex.assert_trees_all_close(vjp(do), vjp_ref(do), atol=tol, rtol=tol)


def test_reference_gradients_are_right():
    # The reference's autodiff gradients, which the kernel is held to, match finite
    # differences (soft-cap and window included).
    q, k, v, *_ = _inputs(4, 1, 6, 6, 2, 1, 4, 4, jnp.float32)
    f = lambda q, k, v: reference.mha_reference(q, k, v, causal=True, sliding_window=3,
                                                logit_soft_cap=2.0)
    check_grads(f, (q, k, v), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


# ----------------------------------------------------------------------------- tiling
@pytest.mark.parametrize("seed", range(3))
def test_block_spans_cover_mask(seed):
    """Brute force: every tile with a kept pair lies in [lo, hi), and every tile in
    [full_lo, full_hi) keeps all its (real query, key) pairs and holds no padded key."""
    rng = np.random.default_rng(seed)
    b, tq, tk, bq, bk = 2, 64, 96, 16, 32
    q_len, kv_len = 60, 90  # the rest is (edge-padded) padding

    def sorted_ints(high, shape, length):
        x = np.sort(rng.integers(0, high, shape), axis=1).astype(np.int32)
        x[:, length:] = x[:, length - 1:length]
        return x

    q_pos, kv_pos = sorted_ints(200, (b, tq), q_len), sorted_ints(200, (b, tk), kv_len)
    q_seg, kv_seg = sorted_ints(3, (b, tq), q_len), sorted_ints(3, (b, tk), kv_len)
    q_real, k_real = np.arange(tq) < q_len, np.arange(tk) < kv_len
    for causal, window, segs in [(True, None, False), (False, 40, True), (True, 30, True)]:
        qs, ks = (q_seg, kv_seg) if segs else (None, None)
        mask = np.asarray(reference.attention_mask(
            b, tq, tk, causal=causal, sliding_window=window, q_segment_ids=qs,
            kv_segment_ids=ks, q_positions=q_pos, kv_positions=kv_pos))[:, 0]
        kept = mask & q_real[None, :, None] & k_real[None, None, :]
        for over in ("kv", "q"):
            spans = np.asarray(gpu_tiling.block_spans(
                q_pos, kv_pos, qs, ks, causal=causal, sliding_window=window, block_q=bq,
                block_k=bk, q_len=q_len, kv_len=kv_len, over=over))
            for bb in range(b):
                for r, (lo, full_lo, full_hi, hi) in enumerate(spans[bb]):
                    assert lo <= full_lo <= full_hi <= hi
                    for c in range(tk // bk if over == "kv" else tq // bq):
                        qi, kj = (r, c) if over == "kv" else (c, r)
                        rows, cols = slice(qi * bq, (qi + 1) * bq), slice(kj * bk, (kj + 1) * bk)
                        where = (causal, window, over, bb, r, c)
                        if kept[bb, rows, cols].any():
                            assert lo <= c < hi, where
                        if full_lo <= c < full_hi:
                            assert k_real[cols].all(), where
                            assert mask[bb, rows, cols][q_real[rows]].all(), where


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, field", [
    (dict(block_q=48), "block_q"),
    (dict(block_kv_dkv=8), "block_kv_dkv"),
    (dict(num_warps=3), "num_warps"),
    (dict(num_stages_bwd=0), "num_stages_bwd"),
    (dict(backward="atomic"), "backward"),
    (dict(forward="cuda"), "forward"),
])
def test_block_sizes_reject_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        gpu.BlockSizes(**kwargs)


def test_bad_arguments_raise_value_error():
    q, k, v, *_ = _inputs(0, 1, 16, 16, 4, 2, 16, 16, jnp.float32)
    with pytest.raises(ValueError, match="block_sizes"):
        gpu.flash_attention(q, k, v, block_sizes=(128, 128))
    with pytest.raises(ValueError, match="logit_soft_cap"):
        gpu.flash_attention(q, k, v, logit_soft_cap=-1.0)
    with pytest.raises(ValueError, match="divisible"):
        gpu.flash_attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2))
    with pytest.raises(ValueError, match="sliding_window"):
        gpu.flash_attention(q, k, v, sliding_window=0)


# ----------------------------------------------------------------------------- slow grid
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("mask", ["none", "causal", "window", "causal_window", "segments"])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_grid(dtype, mask, group):
    b, t = 2, 50
    kw = {"none": {}, "causal": dict(causal=True), "window": dict(sliding_window=13),
          "causal_window": dict(causal=True, sliding_window=13)}.get(mask)
    if mask == "segments":
        seg = jnp.array([[1] * 20 + [2] * 25 + [0] * 5, [1] * 7 + [2] * 43])
        kw = dict(causal=True, segment_ids=seg)
    _check(kw, b=b, tq=t, tk=t, h=8, hkv=8 // group, d=64, dtype=dtype)


@pytest.mark.slow
@pytest.mark.parametrize("d, dv", [(64, 64), (128, 128), (192, 128), (256, 256)])
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims(d, dv, causal):
    _check(dict(causal=causal), tq=40, tk=72, h=2, hkv=1, d=d, dv=dv, dtype=jnp.bfloat16,
           block_sizes=None)


@pytest.mark.slow
@pytest.mark.parametrize("tq, tk", [(17, 80), (80, 17), (1, 33), (64, 64)])
def test_lengths_softcap(tq, tk):
    _check(dict(causal=True, logit_soft_cap=3.0), tq=tq, tk=tk, h=2, hkv=1)


# ----------------------------------------------------------------------------- Hopper kernels
# gpu_hopper.py / gpu_hopper_bwd.py are Mosaic GPU kernels (warpgroup MMA, TMA, warp
# specialisation): they lower only on a Hopper GPU and jax's Mosaic GPU interpreter cannot
# run them (no `run_state`), so their numerical tests run compiled on an H100/H200
# (`JAX_PLATFORMS=cuda pytest -k hopper`). On CPU the tests below check who takes which
# call and the errors.
# The Hopper forward and backward, or a ValueError saying why not.
HOPPER = gpu.BlockSizes(forward="hopper", backward="hopper")
ON_HOPPER = ON_GPU and gpu.is_hopper()


@pytest.mark.skipif(not ON_HOPPER, reason="compiled Mosaic GPU kernel: runs on a Hopper GPU")
@pytest.mark.parametrize("d, causal, h, hkv, t, dtype", [
    (128, True, 4, 4, 512, jnp.bfloat16),
    (128, False, 8, 2, 256, jnp.bfloat16),
    (128, True, 8, 1, 1024, jnp.float16),
    (64, True, 4, 1, 512, jnp.bfloat16),
    (64, False, 2, 2, 768, jnp.bfloat16),
    (256, True, 4, 2, 384, jnp.bfloat16),
    (256, False, 2, 2, 128, jnp.float16),
])
def test_hopper_forward_and_gradients(d, causal, h, hkv, t, dtype):
    """Hopper forward and backward (Triton backward at D=256) vs the f32 reference."""
    blocks = dataclasses.replace(gpu.BlockSizes.get_default(d), forward="hopper",
                                 backward="hopper" if d <= 128 else "split")
    _check(dict(causal=causal), b=2, tq=t, tk=t, h=h, hkv=hkv, d=d, dtype=dtype,
           block_sizes=blocks)


@pytest.mark.skipif(not ON_HOPPER, reason="compiled Mosaic GPU kernel: runs on a Hopper GPU")
@pytest.mark.parametrize("tiles", [gpu_hopper_bwd.HopperBackwardBlocks(128, 128, 2),
                                   gpu_hopper_bwd.HopperBackwardBlocks(64, 64, 3)])
def test_hopper_backward_tilings(tiles):
    """Other tilings of the Hopper backward (called directly) vs the f32 reference's vjp."""
    q, k, v, do, _ = _inputs(1, 1, 512, 512, 4, 2, 128, 128, jnp.bfloat16)
    o, lse = gpu.flash_attention_with_lse(q, k, v, causal=True, block_sizes=HOPPER)
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do)
    got = gpu_hopper_bwd.backward(q, k, v, do, lse, delta, causal=True,
                                  sm_scale=128**-0.5, blocks=tiles)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    _, vjp = jax.vjp(lambda *a: reference.mha_reference(*a, causal=True), *f32)
    for name, g, w in zip("qkv", got, vjp(do), strict=True):
        scale = max(1.0, float(jnp.max(jnp.abs(w))))
        chex.assert_trees_all_close(g.astype(jnp.float32) / scale, w / scale, atol=2e-2,
                                    rtol=2e-2, custom_message=f"d{name}")


@pytest.mark.skipif(not ON_HOPPER, reason="compiled Mosaic GPU kernel: runs on a Hopper GPU")
def test_hopper_matches_triton_forward():
    """Both forwards on one bf16 problem: outputs within bf16 rounding, lse within f32 noise."""
    q, k, v, _, _ = _inputs(0, 2, 2048, 2048, 8, 2, 128, 128, jnp.bfloat16)
    o_h, lse_h = gpu.flash_attention_with_lse(q, k, v, causal=True, block_sizes=HOPPER)
    o_t, lse_t = gpu.flash_attention_with_lse(
        q, k, v, causal=True, block_sizes=gpu.BlockSizes(forward="triton"))
    chex.assert_trees_all_close(o_h.astype(jnp.float32), o_t.astype(jnp.float32), atol=1e-2)
    chex.assert_trees_all_close(lse_h, lse_t, atol=1e-3)


def _packed(b, t, docs, seed, padding=True):
    """[b, t] int32 segment ids of `docs` packed documents per row of random lengths (ids
    1..docs), the last `padding` stretch (a random one) marked 0, as data/ packs them."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(b):
        cuts = np.sort(rng.choice(np.arange(1, t), docs - 1 + padding, replace=False))
        ids = np.searchsorted(cuts, np.arange(t), side="right") + 1
        if padding:
            ids[ids == docs + 1] = 0
        rows.append(ids)
    return jnp.asarray(np.stack(rows), jnp.int32)


@pytest.mark.skipif(not ON_HOPPER, reason="compiled Mosaic GPU kernel: runs on a Hopper GPU")
@pytest.mark.parametrize("d, causal, h, hkv, t, docs, dtype", [
    (128, True, 8, 2, 1024, 4, jnp.bfloat16),
    (128, False, 4, 4, 512, 3, jnp.bfloat16),
    (128, True, 4, 1, 2048, 16, jnp.float16),
    (64, True, 4, 1, 768, 4, jnp.bfloat16),
    (64, False, 8, 2, 512, 5, jnp.bfloat16),
    (256, True, 4, 2, 384, 3, jnp.bfloat16),
    (256, False, 2, 2, 256, 2, jnp.float16),
])
def test_hopper_segments_forward_and_gradients(d, causal, h, hkv, t, docs, dtype):
    """Packed documents (padding 0 at the end of each row) through the Hopper kernels
    (forward="hopper" raises if they do not take the call; Triton backward at D=256)."""
    blocks = dataclasses.replace(gpu.BlockSizes.get_default(d), forward="hopper",
                                 backward="hopper" if d <= 128 else "split")
    seg = _packed(2, t, docs, seed=t + d)
    _check(dict(causal=causal, segment_ids=seg), b=2, tq=t, tk=t, h=h, hkv=hkv, d=d,
           dtype=dtype, block_sizes=blocks)


@pytest.mark.skipif(not ON_HOPPER, reason="compiled Mosaic GPU kernel: runs on a Hopper GPU")
@pytest.mark.parametrize("causal", [True, False])
def test_hopper_segment_pairs_with_empty_rows(causal):
    """(q_seg, kv_seg) pairs where whole query tiles, and a warpgroup's rows, have a segment
    (9) no key has: those rows give o = 0 and lse = -inf, and zero gradients."""
    t = 512
    kv_seg = _packed(2, t, 3, seed=1)
    q_seg = kv_seg.at[:, :128].set(9).at[:, 192:256].set(9).at[:, 300:310].set(9)
    o = _check(dict(causal=causal, segment_ids=(q_seg, kv_seg)), b=2, tq=t, tk=t, h=4, hkv=2,
               d=128, dtype=jnp.bfloat16, block_sizes=HOPPER)
    chex.assert_trees_all_equal(o[:, :128], jnp.zeros_like(o[:, :128]))


@pytest.mark.skipif(not ON_HOPPER, reason="compiled Mosaic GPU kernel: runs on a Hopper GPU")
@pytest.mark.parametrize("fwd_tiles, bwd_tiles", [
    (gpu_hopper.HopperBlocks(block_kv=64, stages=3), gpu_hopper_bwd.HopperBackwardBlocks(64, 64, 3)),
    (gpu_hopper.HopperBlocks(block_kv=128, stages=2),
     gpu_hopper_bwd.HopperBackwardBlocks(128, 128, 2)),
])
def test_hopper_segments_tilings(fwd_tiles, bwd_tiles):
    """Other tilings of both Hopper kernels with segment ids (called directly), causal."""
    q, k, v, do, _ = _inputs(2, 2, 1024, 1024, 4, 2, 128, 128, jnp.bfloat16)
    seg = _packed(2, 1024, 6, seed=2)
    o, lse = gpu_hopper.forward(q, k, v, causal=True, sm_scale=128**-0.5, blocks=fwd_tiles,
                                segment_ids=seg)
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do)
    got = gpu_hopper_bwd.backward(q, k, v, do, lse, delta, causal=True, sm_scale=128**-0.5,
                                  blocks=bwd_tiles, segment_ids=seg)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = lambda *a: reference.mha_reference(*a, causal=True, segment_ids=seg)
    o_ref, vjp = jax.vjp(ref, *f32)
    chex.assert_trees_all_close(o.astype(jnp.float32), o_ref, atol=2e-2, rtol=2e-2)
    for name, g, w in zip("qkv", got, vjp(do), strict=True):
        scale = max(1.0, float(jnp.max(jnp.abs(w))))
        chex.assert_trees_all_close(g.astype(jnp.float32) / scale, w / scale, atol=2e-2,
                                    rtol=2e-2, custom_message=f"d{name}")


@pytest.mark.skipif(not ON_HOPPER, reason="compiled Mosaic GPU kernel: runs on a Hopper GPU")
def test_hopper_segments_match_triton():
    """Both kernel families on one packed bf16 problem (8 documents per row), values and grads."""
    q, k, v, do, _ = _inputs(3, 2, 4096, 4096, 8, 2, 128, 128, jnp.bfloat16)
    seg = _packed(2, 4096, 8, seed=3)

    def run(blocks):
        fn = lambda q, k, v: gpu.flash_attention_with_lse(q, k, v, causal=True, segment_ids=seg,
                                                          block_sizes=blocks)
        (o, lse), vjp = jax.vjp(fn, q, k, v)
        return o, lse, vjp((do.astype(o.dtype), jnp.zeros_like(lse)))

    o_h, lse_h, g_h = run(HOPPER)
    o_t, lse_t, g_t = run(gpu.BlockSizes(forward="triton", backward="split"))
    chex.assert_trees_all_close(o_h.astype(jnp.float32), o_t.astype(jnp.float32), atol=1e-2)
    chex.assert_trees_all_close(lse_h, lse_t, atol=1e-3)
    for name, a, b in zip("qkv", g_h, g_t, strict=True):
        scale = max(1.0, float(jnp.max(jnp.abs(b.astype(jnp.float32)))))
        chex.assert_trees_all_close(a.astype(jnp.float32) / scale, b.astype(jnp.float32) / scale,
                                    atol=2e-2, custom_message=f"d{name}")


@pytest.mark.parametrize("kw, shapes, reason", [
    (dict(sinks=jnp.zeros((4,))), None, "sinks"),
    (dict(q_positions=jnp.zeros((1, 256), jnp.int32)), None, "q_positions"),
    (dict(segment_ids=jnp.ones((1, 256), jnp.int32), sliding_window=64), None, "sliding_window"),
    (dict(segment_ids=jnp.ones((1, 128), jnp.int32)), None, "segment ids of shapes"),
    (dict(sliding_window=64), None, "sliding_window"),
    (dict(logit_soft_cap=30.0), None, "logit_soft_cap"),
    ({}, dict(dtype=jnp.float32), "dtype"),
    ({}, dict(d=96), "head dims"),
    ({}, dict(tk=512), "q_len"),
    ({}, dict(t=320), "multiple"),
    ({}, dict(t=128), "shorter"),
])
def test_hopper_unsupported_reason(kw, shapes, reason):
    shapes = dict(dict(t=256, tk=None, d=128, dtype=jnp.bfloat16), **(shapes or {}))
    t, d = shapes["t"], shapes["d"]
    q = jax.ShapeDtypeStruct((1, t, 4, d), shapes["dtype"])
    kv = jax.ShapeDtypeStruct((1, shapes["tk"] or t, 2, d), shapes["dtype"])
    tiles = gpu_hopper.HopperBlocks.get_default(d)
    assert reason in gpu_hopper.unsupported_reason(q, kv, kv, blocks=tiles, **kw)


def test_hopper_supported_case_has_no_reason():
    q = jax.ShapeDtypeStruct((2, 1024, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 1024, 2, 128), jnp.bfloat16)
    tiles = gpu_hopper.HopperBlocks.get_default(128)
    assert gpu_hopper.unsupported_reason(q, kv, kv, blocks=tiles, segment_ids=None,
                                         sliding_window=None) is None
    assert tiles.smem_bytes(128) <= gpu_hopper.SMEM_BYTES
    for d in (64, 128, 256):  # every default tiling fits in shared memory
        assert gpu_hopper.HopperBlocks.get_default(d).smem_bytes(d) <= gpu_hopper.SMEM_BYTES


@pytest.mark.parametrize("d", [64, 128, 256])
def test_hopper_takes_segment_ids(d):
    """Segment ids (one array, or a q/kv pair at q_len == kv_len) are Hopper calls now, in
    the forward and (D <= 128) the backward, with every default tiling's id buffers."""
    q = jax.ShapeDtypeStruct((2, 1024, 8, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 1024, 2, d), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((2, 1024), jnp.int32)
    tiles = gpu_hopper.HopperBlocks.get_default(d)
    for ids in (seg, (seg, seg)):
        assert gpu_hopper.unsupported_reason(q, kv, kv, blocks=tiles, segment_ids=ids) is None
        reason = gpu_hopper_bwd.unsupported_reason(
            q, kv, kv, blocks=gpu_hopper_bwd.HopperBackwardBlocks(), segment_ids=ids)
        assert reason is None if d <= 128 else "head dim 256" in reason
    assert tiles.smem_bytes(d, segments=True) <= gpu_hopper.SMEM_BYTES


def test_hopper_routing_with_segments(monkeypatch):
    """gpu.py's choice as on a compiled Hopper GPU (is_hopper faked): segment ids go to the
    Hopper kernels; with a window, or padded to the Triton tiles, they stay on Triton."""
    monkeypatch.setattr(gpu, "is_hopper", lambda: True)
    q = jax.ShapeDtypeStruct((2, 1024, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 1024, 2, 128), jnp.bfloat16)
    seg = jnp.ones((2, 1024), jnp.int32)
    blocks = gpu.BlockSizes.get_default(128)
    none = dict(q_positions=None, logit_soft_cap=None, sinks=None, dropout_rate=None)
    choose = functools.partial(gpu._hopper_blocks, q, kv, kv, blocks, False, **none)
    fwd, bwd = choose(tq_pad=1024, tk_pad=1024, sliding_window=None, segment_ids=seg)
    assert isinstance(fwd, gpu_hopper.HopperBlocks)
    assert isinstance(bwd, gpu_hopper_bwd.HopperBackwardBlocks)
    assert choose(tq_pad=1024, tk_pad=1024, sliding_window=64, segment_ids=seg) == (None, None)
    assert choose(tq_pad=1152, tk_pad=1152, sliding_window=None, segment_ids=seg) == (None, None)


@pytest.mark.parametrize("over, rows, block", [("kv", 64, 128), ("kv", 64, 64), ("kv", 64, 256),
                                               ("q", 64, 64), ("q", 64, 128)])
@pytest.mark.parametrize("causal", [True, False])
def test_hopper_segment_spans_cover_mask(over, rows, block, causal):
    """Brute force on random packed ids (and a pair with rows that see no key): per thread
    block of 2 x `rows` rows, lo <= own_lo <= full_lo <= full_hi <= own_hi <= hi; every
    streamed tile with a kept pair of a warpgroup lies in its [own_lo, own_hi); every tile
    of [full_lo, full_hi) keeps all its pairs; [lo, hi) is the union of the two spans."""
    b, t = 2, 1024
    kv_seg = _packed(b, t, 5, seed=rows + block + causal)
    pairs = [(kv_seg, kv_seg), (kv_seg.at[:, :128].set(9).at[:, 700:720].set(9), kv_seg)]
    for q_seg, k_seg in pairs:
        spans = np.asarray(gpu_hopper.segment_spans(q_seg, k_seg, causal=causal, rows=rows,
                                                    block=block, over=over))
        mask = np.asarray(reference.attention_mask(b, t, t, causal=causal, q_segment_ids=q_seg,
                                                   kv_segment_ids=k_seg))[:, 0]
        if over == "q":
            mask = np.swapaxes(mask, 1, 2)  # rows: keys, columns: queries
        assert spans.shape == (b, t // (2 * rows), 2, 6)
        for bb in range(b):
            for blk in range(t // (2 * rows)):
                for w in range(2):
                    lo, own_lo, full_lo, full_hi, own_hi, hi = spans[bb, blk, w]
                    assert lo <= own_lo <= full_lo <= full_hi <= own_hi <= hi
                    r0 = (2 * blk + w) * rows
                    kept = mask[bb, r0:r0 + rows].reshape(rows, t // block, block)
                    needed = np.flatnonzero(kept.any(axis=(0, 2)))
                    assert all(own_lo <= c < own_hi for c in needed), (bb, blk, w)
                    assert kept[:, full_lo:full_hi].all(), (bb, blk, w)
                ends = [(s[1], s[4]) for s in spans[bb, blk] if s[1] < s[4]]
                if ends:
                    assert spans[bb, blk, 0, 0] == min(e[0] for e in ends)
                    assert spans[bb, blk, 0, 5] == max(e[1] for e in ends)
                else:
                    assert spans[bb, blk, 0, 0] == spans[bb, blk, 0, 5]


@pytest.mark.skipif(ON_HOPPER, reason="checks the refusal off Hopper")
@pytest.mark.parametrize("field", ["forward", "backward"])
def test_hopper_refused_off_hopper(field):
    """forward/backward='hopper' where the kernel cannot run: a ValueError naming the field."""
    q, k, v, _, _ = _inputs(0, 1, 256, 256, 4, 2, 128, 128, jnp.bfloat16)
    with pytest.raises(ValueError, match=f"{field}='hopper'"):
        gpu.flash_attention(q, k, v, causal=True, block_sizes=gpu.BlockSizes(**{field: "hopper"}))


def test_hopper_backward_unsupported_reason():
    """The backward takes what the forward takes at head dims 64 and 128, not 256."""
    tiles = gpu_hopper_bwd.HopperBackwardBlocks()
    for d in (64, 128):
        q = jax.ShapeDtypeStruct((2, 1024, 8, d), jnp.bfloat16)
        kv = jax.ShapeDtypeStruct((2, 1024, 2, d), jnp.bfloat16)
        assert gpu_hopper_bwd.unsupported_reason(q, kv, kv, blocks=tiles) is None
    q = jax.ShapeDtypeStruct((1, 512, 2, 256), jnp.bfloat16)
    assert "head dim 256" in gpu_hopper_bwd.unsupported_reason(q, q, q, blocks=tiles)
    q = jax.ShapeDtypeStruct((1, 512, 2, 128), jnp.bfloat16)
    assert "sliding_window" in gpu_hopper_bwd.unsupported_reason(q, q, q, blocks=tiles,
                                                                 sliding_window=64)
    big = gpu_hopper_bwd.HopperBackwardBlocks(128, 128, 4)
    assert "shared memory" in gpu_hopper_bwd.unsupported_reason(q, q, q, blocks=big)


@pytest.mark.parametrize("kwargs, field", [
    (dict(block_kv_dq=32), "block_kv_dq"), (dict(block_q_dkv=192), "block_q_dkv"),
    (dict(stages=1), "stages")])
def test_hopper_backward_blocks_reject_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        gpu_hopper_bwd.HopperBackwardBlocks(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    (dict(block_kv=96), "block_kv"), (dict(block_q=32), "block_q"), (dict(stages=1), "stages")])
def test_hopper_blocks_reject_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        gpu_hopper.HopperBlocks(**kwargs)
