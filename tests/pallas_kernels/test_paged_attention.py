"""Paged decode attention: kernels (GPU and TPU families, interpret mode) and the
reference against an independent per-sequence dense attention in float64 numpy."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_attention import gpu as paged_gpu
from pallas_kernels.paged_attention import paged_attention, paged_attention_reference
from pallas_kernels.paged_attention import tpu as paged_tpu

TOL = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def make_inputs(seed, *, batch, heads, kv_heads, head_dim, num_pages, page_size, max_pages,
                lengths, dtype):
    """Random pool and page tables; table entries past a sequence's pages are garbage."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, heads, head_dim))
    kp = rng.standard_normal((kv_heads, num_pages, page_size, head_dim))
    vp = rng.standard_normal((kv_heads, num_pages, page_size, head_dim))
    table = np.full((batch, max_pages), -1, np.int32)
    table[:, 1::2] = 10**6  # out-of-range garbage must be harmless too
    for b, n in enumerate(lengths):
        used = -(-n // page_size)
        table[b, :used] = rng.choice(num_pages, size=used, replace=False)
    cast = lambda x: jnp.asarray(x, dtype)
    return cast(q), cast(kp), cast(vp), jnp.asarray(lengths, jnp.int32), jnp.asarray(table)


def dense_attention(q, kp, vp, lengths, table, *, sliding_window=None, logit_soft_cap=None):
    """Independent model: walk each sequence token by token, softmax in float64."""
    q, kp, vp = (np.asarray(x, np.float64) for x in (q, kp, vp))
    b, h, d = q.shape
    hkv, _, page_size, _ = kp.shape
    out = np.zeros((b, h, d))
    for i in range(b):
        n = int(lengths[i])
        first = 0 if sliding_window is None else max(0, n - sliding_window)
        slots = [(int(table[i, t // page_size]), t % page_size) for t in range(first, n)]
        if not slots:
            continue
        for head in range(h):
            kv = head // (h // hkv)
            keys = np.stack([kp[kv, p, s] for p, s in slots])  # [n, D]
            vals = np.stack([vp[kv, p, s] for p, s in slots])
            logits = keys @ q[i, head] / np.sqrt(d)
            if logit_soft_cap is not None:
                logits = logit_soft_cap * np.tanh(logits / logit_soft_cap)
            w = np.exp(logits - logits.max())
            out[i, head] = (w / w.sum()) @ vals
    return out


# Lengths: empty, mid-page, exactly one page, and the full table (4 pages of 4).
LENGTHS = [0, 7, 4, 16]
SHAPE = dict(batch=4, head_dim=16, num_pages=24, page_size=4, max_pages=4, lengths=LENGTHS)
GQA = {1: (2, 2), 4: (8, 2), 8: (8, 1)}  # ratio -> (heads, kv_heads)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("ratio", [1, 4, 8])
def test_reference_matches_dense(ratio, dtype):
    h, hkv = GQA[ratio]
    args = make_inputs(ratio, heads=h, kv_heads=hkv, dtype=dtype, **SHAPE)
    got = paged_attention(*args, impl="reference")
    chex.assert_shape(got, (4, h, 16))
    assert got.dtype == dtype
    chex.assert_trees_all_close(np.asarray(got, np.float64), dense_attention(*args), **TOL[dtype])


@pytest.mark.parametrize("window,cap", [(5, None), (3, 2.0), (None, 1.5)])
def test_reference_window_and_soft_cap(window, cap):
    args = make_inputs(7, heads=4, kv_heads=2, dtype=jnp.float32, **SHAPE)
    got = paged_attention(*args, impl="reference", sliding_window=window, logit_soft_cap=cap)
    want = dense_attention(*args, sliding_window=window, logit_soft_cap=cap)
    chex.assert_trees_all_close(np.asarray(got, np.float64), want, **TOL[jnp.float32])


def test_reference_empty_sequence_is_zero_and_lse_inf():
    args = make_inputs(3, heads=4, kv_heads=2, dtype=jnp.float32, **SHAPE)
    o, lse = paged_attention_reference(*args, return_lse=True)
    assert np.all(np.asarray(o[0]) == 0) and np.all(np.isneginf(np.asarray(lse[0])))
    assert np.all(np.isfinite(np.asarray(o))) and np.all(np.isfinite(np.asarray(lse[1:])))


# Kernel cases: (ratio, dtype, sliding_window, logit_soft_cap). Each interpret-mode call
# costs seconds on CPU, so the grid is a covering selection, not a full product.
KERNEL_CASES = [
    (1, jnp.float32, None, None),
    (4, jnp.bfloat16, None, None),
    (8, jnp.float32, None, None),
    (4, jnp.float32, 6, 2.0),
]


def _case_id(case):
    ratio, dtype, window, cap = case
    return f"ratio={ratio}_{jnp.dtype(dtype).name}_window={window}_cap={cap}"


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=_case_id)
def test_kernel_matches_reference_and_dense(impl, case):
    if impl == "pallas_tpu" and jax.default_backend() == "gpu":
        pytest.skip("the TPU kernel runs compiled on a TPU or in interpret mode on CPU")
    ratio, dtype, window, cap = case
    h, hkv = GQA[ratio]
    args = make_inputs(ratio + 10, heads=h, kv_heads=hkv, dtype=dtype, **SHAPE)
    kw = dict(sliding_window=window, logit_soft_cap=cap)
    # Two pages per step: the 4-page tables take two steps (double buffer on TPU).
    block_sizes = {"pallas_gpu": paged_gpu.BlockSizes(pages_per_block=2),
                   "pallas_tpu": paged_tpu.BlockSizes(pages_per_block=2)}[impl]
    got = paged_attention(*args, impl=impl, block_sizes=block_sizes, **kw)
    chex.assert_shape(got, (4, h, 16))
    assert got.dtype == dtype
    assert np.all(np.asarray(got[0], np.float32) == 0)  # length 0 -> zeros, no NaN
    ref = paged_attention(*args, impl="reference", **kw)
    chex.assert_trees_all_close(got.astype(jnp.float32), ref.astype(jnp.float32), **TOL[dtype])
    chex.assert_trees_all_close(np.asarray(got, np.float64), dense_attention(*args, **kw),
                                **TOL[dtype])


def test_gpu_split_k_merge():
    """Split-K (3 splits of 2, 2, 1 pages), some empty for short sequences or outside the
    window, merged by log-sum-exp."""
    block_sizes = paged_gpu.BlockSizes(pages_per_block=1, num_splits=3)
    shape = dict(SHAPE, max_pages=5, lengths=[0, 3, 13, 20])
    args = make_inputs(5, heads=8, kv_heads=2, dtype=jnp.float32, **shape)
    got, lse = paged_gpu.paged_attention_gpu(*args, block_sizes=block_sizes, interpret=True,
                                             sliding_window=9, return_lse=True)
    ref, ref_lse = paged_attention_reference(*args, sliding_window=9, return_lse=True)
    chex.assert_trees_all_close(got, ref, **TOL[jnp.float32])
    chex.assert_trees_all_close(lse, ref_lse, **TOL[jnp.float32])


def test_jit_with_traced_lengths():
    args = make_inputs(8, heads=4, kv_heads=2, dtype=jnp.float32, **SHAPE)
    got = jax.jit(lambda *a: paged_attention(*a, impl="reference"))(*args)
    chex.assert_trees_all_close(np.asarray(got, np.float64), dense_attention(*args),
                                **TOL[jnp.float32])


def test_default_gpu_tiling_fills_an_h100():
    """Batch 8, 8 kv heads, 8k context in pages of 16: split-K gives >= 4 programs per SM."""
    bs = paged_gpu.BlockSizes.get_default(page_size=16, head_dim=128, max_pages=512)
    assert bs.pages_per_block * 16 == 64
    num_blocks = 8192 // 16 // bs.pages_per_block
    splits = paged_gpu.default_num_splits(8, 8, num_blocks, num_sms=132)
    assert 8 * 8 * splits >= 4 * 132 and num_blocks / splits >= 4
    # A big batch still splits into MIN_SPLITS (measured faster), a short table less.
    assert paged_gpu.default_num_splits(256, 8, num_blocks, num_sms=132) == paged_gpu.MIN_SPLITS
    assert paged_gpu.default_num_splits(256, 8, 8, num_sms=132) == 2
    # Odd head dims and short tables still give a power-of-two block.
    assert paged_gpu.BlockSizes.get_default(page_size=16, head_dim=96, max_pages=512).pages_per_block == 4
    assert paged_gpu.BlockSizes.get_default(page_size=4, head_dim=64, max_pages=3).pages_per_block == 4


def test_gpu_kernel_blocks_of_16bit_keys_hold_at_least_16():
    """Triton's 16-bit MMA contracts over >= 16 keys: pages of 4 go 4 to a block."""
    args = make_inputs(1, heads=4, kv_heads=2, dtype=jnp.bfloat16, **SHAPE)
    fn = functools.partial(paged_gpu.paged_attention_gpu, interpret=True,
                           block_sizes=paged_gpu.BlockSizes(pages_per_block=1, kernel="triton"))
    assert "paged_attention_ppb4_" in str(jax.make_jaxpr(fn)(*args))
    f32 = [a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for a in args]
    assert "paged_attention_ppb1_" in str(jax.make_jaxpr(fn)(*f32))


def _good():
    return list(make_inputs(0, heads=4, kv_heads=2, dtype=jnp.float32, **SHAPE))


@pytest.mark.parametrize("index,bad,match", [
    (0, jnp.zeros((4, 4, 16, 1)), "q must have rank 3"),
    (0, jnp.zeros((4, 4, 8)), "head_dim"),
    (0, jnp.zeros((4, 3, 16)), "divisible by kv_heads"),
    (0, jnp.zeros((4, 4, 16), jnp.int32), "q.dtype"),
    (1, jnp.zeros((2, 24, 4)), "k_pages must have rank 4"),
    (2, jnp.zeros((2, 24, 8, 16)), "k_pages and v_pages"),
    (2, jnp.zeros((2, 24, 4, 16), jnp.bfloat16), "k_pages and v_pages"),
    (3, jnp.zeros((3,), jnp.int32), "lengths"),
    (3, jnp.zeros((4,), jnp.float32), "lengths.dtype"),
    (3, jnp.array([0, 1, 2, 17], jnp.int32), "lengths must lie in"),
    (3, jnp.array([0, -1, 2, 3], jnp.int32), "lengths must lie in"),
    (4, jnp.zeros((4,), jnp.int32), "page_table"),
    (4, jnp.zeros((4, 4), jnp.int64 if jax.config.jax_enable_x64 else jnp.int16),
     "page_table.dtype"),
])
def test_bad_inputs_raise(index, bad, match):
    args = _good()
    args[index] = bad
    with pytest.raises(ValueError, match=match):
        paged_attention(*args)


@pytest.mark.parametrize("kw,match", [
    (dict(impl="flash"), "impl"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(logit_soft_cap=-1.0), "logit_soft_cap"),
    (dict(sm_scale=0.0), "sm_scale"),
])
def test_bad_options_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        paged_attention(*_good(), **kw)


def test_gpu_kernel_rejects_untileable_head_dim():
    args = list(make_inputs(0, heads=4, kv_heads=2, dtype=jnp.float32,
                            **dict(SHAPE, head_dim=12)))
    with pytest.raises(ValueError, match="head_dim=12 must be a power of two"):
        paged_attention(*args, impl="pallas_gpu")
    with pytest.raises(ValueError, match="pages_per_block"):
        paged_gpu.BlockSizes(pages_per_block=3)
