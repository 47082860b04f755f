"""Cascade decode attention (shared prefix read once per chunk of rows) equals plain
paged attention over the full page tables; the host finds the shared prefix."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.paged_attention.api import returns_lse
from pallas_kernels.paged_attention.cascade import (
    MIN_TABLE_WIDTH,
    SharedPrefix,
    cascade_paged_attention,
    find_shared_prefix,
)

PAGE = 4


def shared_prefix_batch(seed, *, heads, kv_heads, head_dim=16, max_pages=6, dtype=jnp.float32):
    """5 rows: rows 0, 1, 3 share 3 pages (row 3 holds exactly those), row 2 has its own
    pages, row 4 is empty. Page ids are scattered over a pool of 40 pages."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(40)
    shared = perm[:3]
    own = perm[3:].reshape(-1, 1)
    table = np.zeros((5, max_pages), np.int32)
    for r in (0, 1, 3):
        table[r, :3] = shared
    table[0, 3:6] = own[0:3, 0]
    table[1, 3:5] = own[3:5, 0]
    table[2, :6] = own[5:11, 0]
    lengths = np.array([3 * PAGE + 9, 3 * PAGE + 5, 5 * PAGE + 2, 3 * PAGE, 0], np.int32)
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (5, heads, head_dim), dtype)
    kp = jax.random.normal(ks[1], (kv_heads, 40, PAGE, head_dim), dtype)
    vp = jax.random.normal(ks[2], (kv_heads, 40, PAGE, head_dim), dtype)
    return q, kp, vp, lengths, table


def test_find_shared_prefix():
    _, _, _, lengths, table = shared_prefix_batch(0, heads=2, kv_heads=1)
    p = find_shared_prefix(table, lengths, PAGE)
    assert int(p.length) == 3 * PAGE
    np.testing.assert_array_equal(p.shares, [True, True, False, True, False])
    np.testing.assert_array_equal(p.pages[:3], table[0, :3])
    np.testing.assert_array_equal(p.suffix_table[0, :3], table[0, 3:])
    np.testing.assert_array_equal(p.suffix_table[2], table[2])
    # The shortest sharing row caps the prefix at its full pages.
    short = lengths.copy()
    short[3] = 2 * PAGE + 1
    assert int(find_shared_prefix(table, short, PAGE).length) == 2 * PAGE
    # Nothing shared: no prefix.
    assert find_shared_prefix(table[[0, 2]], lengths[[0, 2]], PAGE) is None
    assert find_shared_prefix(table[:1], lengths[:1], PAGE) is None


def test_find_shared_prefix_trims_wide_tables():
    """Short rows in a wide table: the prefix and suffix tables are cut to a power of
    two >= MIN_TABLE_WIDTH that still holds every page a row holds."""
    _, _, _, lengths, table = shared_prefix_batch(0, heads=2, kv_heads=1, max_pages=40)
    p = find_shared_prefix(table, lengths, PAGE)
    assert MIN_TABLE_WIDTH == 8
    assert p.pages.shape == (8,) and p.suffix_table.shape == (5, 8)  # 3 shared, row 2 holds 6
    np.testing.assert_array_equal(p.pages[:3], table[0, :3])
    np.testing.assert_array_equal(p.suffix_table[2], table[2, :8])
    np.testing.assert_array_equal(p.suffix_table[0, :3], table[0, 3:6])
    # Pages held beyond the length (reserved for the tokens a decode call writes) are kept.
    held = np.array([6, 5, 20, 3, 0])
    assert find_shared_prefix(table, lengths, PAGE, pages_held=held).suffix_table.shape == (5, 32)
    held[0] = 3 + 33  # a sharing row's own pages count after the prefix: 33 -> 64
    assert find_shared_prefix(table, lengths, PAGE, pages_held=held).suffix_table.shape == (5, 40)


@pytest.mark.parametrize("impl, heads, kv_heads, chunk, max_pages", [
    ("pallas_gpu", 4, 4, None, 6), ("pallas_gpu", 8, 2, 2, 6), ("reference", 8, 1, 1, 6),
    ("pallas_gpu", 16, 2, None, 6),  # GQA 1 / 4 / 8 / 8; 64 prefix rows per kv head in the last
    ("pallas_gpu", 8, 2, None, 40)])  # a wide table, cut by find_shared_prefix
def test_cascade_equals_plain_paged_attention(impl, heads, kv_heads, chunk, max_pages):
    q, kp, vp, lengths, table = shared_prefix_batch(1, heads=heads, kv_heads=kv_heads,
                                                    max_pages=max_pages)
    want = paged_attention(q, kp, vp, jnp.asarray(lengths), jnp.asarray(table), impl="reference")
    prefix = SharedPrefix(*map(jnp.asarray, find_shared_prefix(table, lengths, PAGE)))
    got = cascade_paged_attention(q, kp, vp, jnp.asarray(lengths), prefix, impl=impl, chunk=chunk)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert np.all(np.asarray(got[4]) == 0)  # the empty row


def test_cascade_soft_cap_bf16_under_jit():
    q, kp, vp, lengths, table = shared_prefix_batch(2, heads=8, kv_heads=2, dtype=jnp.bfloat16)
    want = paged_attention(q, kp, vp, jnp.asarray(lengths), jnp.asarray(table), impl="reference",
                           logit_soft_cap=5.0)
    prefix = SharedPrefix(*map(jnp.asarray, find_shared_prefix(table, lengths, PAGE)))
    got = jax.jit(lambda q, lens, p: cascade_paged_attention(
        q, kp, vp, lens, p, impl="reference", logit_soft_cap=5.0))(q, jnp.asarray(lengths), prefix)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2)


def test_tpu_kernel_refuses_return_lse_and_cascade_knows():
    """The TPU kernel has no log-sum-exp output: asked explicitly it raises (before any
    compute), and `returns_lse` tells callers (serving/cache.py) to skip the cascade."""
    q, kp, vp, lengths, table = shared_prefix_batch(3, heads=4, kv_heads=2)
    with pytest.raises(ValueError, match="impl='pallas_tpu' cannot run this input: .*log-sum-exp"):
        paged_attention(q, kp, vp, jnp.asarray(lengths), jnp.asarray(table), impl="pallas_tpu",
                        return_lse=True)
    assert not returns_lse("pallas_tpu")
    assert returns_lse("pallas_gpu") and returns_lse("reference")
    assert returns_lse("auto") == (jax.default_backend() != "tpu")
