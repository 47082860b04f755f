"""The Mosaic GPU paged decode kernel (pallas_kernels/paged_attention/gpu_hopper.py).

It has no interpret mode: its values are checked compiled on a Hopper GPU
(`JAX_PLATFORMS=cuda pytest tests/pallas_kernels/test_paged_attention_hopper.py`), against
the float64 dense model of test_paged_attention.py. On CPU the tests check that it
lowers to Mosaic GPU for the shapes it takes (layout and tiling errors show there), and
who takes which call.
"""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_paged_attention import dense_attention, make_inputs

from pallas_kernels.paged_attention import gpu as paged_gpu
from pallas_kernels.paged_attention import gpu_hopper, paged_attention, paged_attention_reference

ON_HOPPER = jax.default_backend() == "gpu" and paged_gpu.is_hopper()
needs_hopper = pytest.mark.skipif(not ON_HOPPER, reason="Mosaic GPU kernel: runs on a Hopper GPU")
BF16 = dict(atol=2e-2, rtol=2e-2)


def _hopper(tiles=None):
    return paged_gpu.BlockSizes(kernel="hopper", hopper=tiles)


@pytest.mark.parametrize("group,head_dim,window,tiles", [
    (4, 128, None, gpu_hopper.HopperPagedBlocks()),
    (1, 64, 100, gpu_hopper.HopperPagedBlocks(block_k=128, stages=2, num_splits=3)),
    (8, 256, None, gpu_hopper.HopperPagedBlocks(block_k=64, stages=2)),
])
def test_lowers_to_mosaic_gpu_on_cpu(group, head_dim, window, tiles):
    b, hkv, page_size, max_pages = 3, 2, 16, 40
    q = jax.ShapeDtypeStruct((b, hkv, gpu_hopper.WGMMA_ROWS, head_dim), jnp.bfloat16)
    pages = jax.ShapeDtypeStruct((hkv, b * max_pages, page_size, head_dim), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((b,), jnp.int32)
    table = jax.ShapeDtypeStruct((b, max_pages), jnp.int32)
    fn = jax.jit(lambda *a: gpu_hopper.partial_attention(
        *a, group=group, sm_scale=0.1, sliding_window=window, num_splits=tiles.num_splits or 2,
        blocks=tiles))
    lowered = fn.trace(q, pages, pages, lengths, table).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert "mosaic_gpu" in text
    assert "paged_attention_hopper_bk" in text  # its own name in profiles, not "entry"
    o, lse = jax.eval_shape(fn, q, pages, pages, lengths, table)
    assert o.shape[1:] == (b, hkv, group, head_dim) and lse.shape[1:] == (b, hkv, 64)


@pytest.mark.parametrize("kw,dtype,head_dim,page_size,tiles,reason", [
    (dict(logit_soft_cap=2.0), jnp.bfloat16, 128, 16, (64, 4), "logit_soft_cap"),
    ({}, jnp.float32, 128, 16, (64, 4), "dtype"),
    ({}, jnp.bfloat16, 96, 16, (64, 4), "head_dim"),
    ({}, jnp.bfloat16, 128, 12, (64, 4), "page_size"),
    ({}, jnp.bfloat16, 128, 16, (128, 4), "shared memory"),
    ({}, jnp.bfloat16, 256, 16, (64, 4), "shared memory"),
])
def test_unsupported_reason(kw, dtype, head_dim, page_size, tiles, reason):
    tiles = gpu_hopper.HopperPagedBlocks(*tiles)
    q = jnp.zeros((2, 8, head_dim), dtype)
    pages = jnp.zeros((2, 4, page_size, head_dim), dtype)
    assert reason in gpu_hopper.unsupported_reason(q, pages, blocks=tiles, **kw)
    q, pages = jnp.zeros((2, 8, 128), jnp.bfloat16), jnp.zeros((2, 4, 16, 128), jnp.bfloat16)
    default = gpu_hopper.HopperPagedBlocks()  # the same call with supported inputs and tiles
    assert gpu_hopper.unsupported_reason(q, pages, blocks=default) is None


def test_routing_and_bad_tiles():
    args = make_inputs(0, batch=2, heads=8, kv_heads=2, head_dim=64, num_pages=8, page_size=16,
                       max_pages=4, lengths=[5, 60], dtype=jnp.bfloat16)
    q, k_pages = args[0], args[1]
    # "auto" off Hopper (or in interpret mode) keeps the Triton kernel; "hopper" says why not.
    assert paged_gpu._hopper_tiles(q, k_pages, paged_gpu.BlockSizes(), True, None) is None
    with pytest.raises(ValueError, match="kernel='hopper' cannot take this call"):
        paged_gpu._hopper_tiles(q, k_pages, _hopper(), True, None)
    with pytest.raises(ValueError, match="kernel='hopper' cannot take this call.*logit_soft_cap"):
        paged_gpu._hopper_tiles(q, k_pages, _hopper(), False, 2.0)
    with pytest.raises(ValueError, match="BlockSizes.kernel"):
        paged_gpu.BlockSizes(kernel="cuda")
    with pytest.raises(ValueError, match="block_k"):
        gpu_hopper.HopperPagedBlocks(block_k=96)
    with pytest.raises(ValueError, match="stages"):
        gpu_hopper.HopperPagedBlocks(stages=1)
    assert gpu_hopper.HopperPagedBlocks().smem_bytes(128) <= gpu_hopper.SMEM_BYTES


# Compiled on Hopper: ragged lengths (empty, mid-page, one page, long), garbage table
# entries past each sequence's pages, GQA 1/4/8, several splits and tiles, windows.
HOPPER_CASES = [
    # (heads, kv_heads, head_dim, window, tiles)
    (32, 8, 128, None, gpu_hopper.HopperPagedBlocks()),
    (8, 8, 128, None, gpu_hopper.HopperPagedBlocks(block_k=128, stages=3, num_splits=1)),
    (16, 2, 64, None, gpu_hopper.HopperPagedBlocks(num_splits=5)),
    (32, 8, 128, 300, gpu_hopper.HopperPagedBlocks(stages=2, num_splits=4)),
    (8, 2, 128, 1000, gpu_hopper.HopperPagedBlocks(block_k=128, stages=3)),
    (8, 1, 256, None, gpu_hopper.HopperPagedBlocks(block_k=64, stages=2)),
]


@needs_hopper
@pytest.mark.parametrize("heads,kv_heads,head_dim,window,tiles", HOPPER_CASES)
def test_hopper_matches_dense(heads, kv_heads, head_dim, window, tiles):
    lengths = [0, 7, 16, 1500, 2048, 333]
    args = make_inputs(heads + head_dim, batch=len(lengths), heads=heads, kv_heads=kv_heads,
                       head_dim=head_dim, num_pages=1024, page_size=16, max_pages=128,
                       lengths=lengths, dtype=jnp.bfloat16)
    got, lse = paged_gpu.paged_attention_gpu(*args, sliding_window=window,
                                             block_sizes=_hopper(tiles), return_lse=True)
    assert np.all(np.asarray(got[0]) == 0) and np.all(np.isneginf(np.asarray(lse[0])))
    chex.assert_trees_all_close(np.asarray(got, np.float64),
                                dense_attention(*args, sliding_window=window), **BF16)
    _, ref_lse = paged_attention_reference(*args, sliding_window=window, return_lse=True)
    chex.assert_trees_all_close(lse[1:], ref_lse[1:], atol=2e-2, rtol=1e-3)
    out = paged_attention(*args, sliding_window=window, impl="pallas_gpu",
                          block_sizes=_hopper(tiles))
    assert out.dtype == jnp.bfloat16
    chex.assert_trees_all_close(out.astype(jnp.float32), got, atol=1e-2)


@needs_hopper
def test_hopper_is_the_default_on_hopper_and_matches_triton():
    args = make_inputs(3, batch=8, heads=32, kv_heads=8, head_dim=128, num_pages=2048,
                       page_size=16, max_pages=256, lengths=[4096, 1, 17, 4000, 2500, 64, 65, 3000],
                       dtype=jnp.bfloat16)
    default = paged_gpu.BlockSizes()
    assert paged_gpu._hopper_tiles(args[0], args[1], default, False, None) is not None
    hopper = paged_attention(*args, impl="pallas_gpu")
    triton = paged_attention(*args, impl="pallas_gpu",
                             block_sizes=dataclasses.replace(default, kernel="triton"))
    chex.assert_trees_all_close(hopper.astype(jnp.float32), triton.astype(jnp.float32), **BF16)
