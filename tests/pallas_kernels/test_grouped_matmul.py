"""Grouped matmul: reference against float64 numpy loops, the Pallas kernels (interpret mode
on CPU) against the reference in values and gradients, the work-item schedule, and every
ValueError of api.py.

Each kernel case runs gmm, its vjp (dlhs through the transposed-rhs gmm, drhs through
tgmm) and tgmm itself in one jitted call, with the group sizes traced. Interpret mode
compiles slowly, so the cases are few and each packs several edge cases: empty groups,
a group holding every row, groups straddling tiles, trailing rows past sum(group_sizes).
"""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from pallas_kernels.grouped_matmul import api, gpu, reference, schedule, tpu

TILES = {"pallas_gpu": gpu.Tiles(block_m=16, block_k=16, block_n=16, group_m=2, num_warps=4),
         "pallas_tpu": tpu.Tiles(block_m=16, block_k=16, block_n=16)}
KERNELS = pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
# The further cases: the TPU kernel's (interpret mode is slow on CPU) under `make test-all`;
# test_kernel_f32_matches_reference keeps it in `make test` (straddled, empty, trailing).
KERNELS_TPU_SLOW = pytest.mark.parametrize(
    "impl", ["pallas_gpu", pytest.param("pallas_tpu", marks=pytest.mark.slow)])

# Group sizes over M=48 rows (3 tiles of 16), 4 groups.
SIZES = {
    "straddle_empty": [10, 0, 25, 13],  # groups cut tiles; an empty group between
    "trailing": [5, 0, 17, 0],  # rows 22..47 in no group: output 0
    "one_group": [0, 48, 0, 0],  # every row in one group, the others empty
    "none": [0, 0, 0, 0],  # every row trailing
}


# ----------------------------------------------------------------------------- numpy
def np_gmm(lhs, rhs, sizes):
    """Dense per-group products in float64, group by group."""
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    start = 0
    for g, size in enumerate(sizes):
        out[start:start + size] = lhs[start:start + size] @ rhs[g]
        start += size
    return out


def np_tgmm(lhs, dout, sizes):
    lhs, dout = np.asarray(lhs, np.float64), np.asarray(dout, np.float64)
    out = np.zeros((len(sizes), lhs.shape[1], dout.shape[1]))
    start = 0
    for g, size in enumerate(sizes):
        out[g] = lhs[start:start + size].T @ dout[start:start + size]
        start += size
    return out


def _inputs(m=48, k=32, n=40, g=4, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    lhs = jax.random.normal(ks[0], (m, k), jnp.float32).astype(dtype)
    rhs = jax.random.normal(ks[1], (g, k, n), jnp.float32).astype(dtype)
    dout = jax.random.normal(ks[2], (m, n), jnp.float32).astype(dtype)
    return lhs, rhs, dout


# ----------------------------------------------------------------------------- reference
@pytest.mark.parametrize("name", list(SIZES))
def test_reference_and_ragged_dot_match_numpy(name):
    sizes = SIZES[name]
    lhs, rhs, dout = _inputs()
    gs = jnp.array(sizes, jnp.int32)
    want, want_t = np_gmm(lhs, rhs, sizes), np_tgmm(lhs, dout, sizes)
    for impl in ("reference", "ragged_dot"):
        np.testing.assert_allclose(api.gmm(lhs, rhs, gs, impl=impl), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(api.tgmm(lhs, dout, gs, impl=impl), want_t, rtol=1e-5,
                                   atol=1e-5)


def test_reference_gradients_numerically():
    lhs, rhs, _ = _inputs(m=12, k=8, n=8, g=3)
    gs = jnp.array([4, 0, 6], jnp.int32)
    check_grads(lambda a, b: reference.gmm_reference(a, b, gs), (lhs, rhs), order=1,
                modes=("rev",), atol=1e-2, rtol=1e-2)


def test_auto_on_cpu_is_ragged_dot_exactly():
    lhs, rhs, dout = _inputs()
    gs = jnp.array(SIZES["straddle_empty"], jnp.int32)

    def run(fn):
        y, vjp = jax.vjp(fn, lhs, rhs)
        return (y,) + vjp(dout)

    ours = run(lambda a, b: api.gmm(a, b, gs))
    theirs = run(lambda a, b: jax.lax.ragged_dot(a, b, gs))
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("zero_trailing,visit_empty", [(True, False), (False, True)])
def test_schedule_covers_every_row_once(zero_trailing, visit_empty):
    rng = np.random.default_rng(0)
    m, bm, g = 50, 8, 6
    for _ in range(20):
        sizes = rng.multinomial(rng.integers(0, m + 1), rng.dirichlet(np.ones(g) * 0.5))
        sizes[rng.random(g) < 0.3] = 0
        s = jax.tree.map(np.asarray, schedule.make_schedule(
            jnp.array(sizes, jnp.int32), m, bm, zero_trailing=zero_trailing,
            visit_empty=visit_empty))
        length = schedule.max_items(m, g, bm, zero_trailing=zero_trailing)
        assert s.group_ids.shape == (length,) and s.num_items <= length
        real = np.arange(length) < s.num_items
        assert (s.group_ids[~real] == g + 1).all() and (s.row_lo[~real] == s.row_hi[~real]).all()
        assert (np.diff(s.m_tile_ids[real]) >= 0).all()  # output tiles revisited consecutively
        covered = np.zeros(m, int)
        for gid, tile, lo, hi in zip(s.group_ids[real], s.m_tile_ids[real], s.row_lo[real],
                                     s.row_hi[real], strict=True):
            rows = np.arange(tile * bm, min(tile * bm + bm, m))
            mine = rows[(rows >= lo) & (rows < hi)]
            assert gid == g or (lo, hi) == (sizes[:gid].sum(), sizes[:gid + 1].sum())
            assert gid != g or (lo, hi) == (sizes.sum(), m)
            assert len(mine) or (visit_empty and lo == hi)  # no item without rows but empty ones
            covered[mine] += 1
        total = sizes.sum()
        assert (covered[:total] == 1).all()
        assert (covered[total:] == (1 if zero_trailing else 0)).all()
        if visit_empty:  # every group has an item
            assert set(range(g)) <= set(s.group_ids[real].tolist())


# ----------------------------------------------------------------------------- kernels
def _fwd_bwd(impl, lhs, rhs, dout, gs, *, tiles, preferred=None):
    """gmm, its vjp (dlhs, drhs) and tgmm(lhs, dout), in one jitted call."""

    @jax.jit
    def run(lhs, rhs, dout, gs):
        fn = functools.partial(api.gmm, group_sizes=gs, impl=impl, tiles=tiles,
                               preferred_element_type=preferred)
        y, vjp = jax.vjp(fn, lhs, rhs)
        t = api.tgmm(lhs, dout, gs, impl=impl, tiles=tiles)
        return (y, *vjp(dout.astype(y.dtype)), t)

    return run(lhs, rhs, dout, gs)


def _check_against_reference(impl, sizes, *, tiles, m=48, k=32, n=40, dtype=jnp.float32,
                             tol=1e-5, preferred=None):
    lhs, rhs, dout = _inputs(m, k, n, len(sizes), dtype)
    gs = jnp.array(sizes, jnp.int32)
    got = _fwd_bwd(impl, lhs, rhs, dout, gs, tiles=tiles, preferred=preferred)
    want = _fwd_bwd("reference", lhs, rhs, dout, gs, tiles=None, preferred=preferred)
    names = ("out", "dlhs", "drhs", "tgmm")
    for name, a, b in zip(names, got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert bool(jnp.isfinite(a.astype(jnp.float32)).all()), f"{name}: unwritten rows"
        scale = max(1.0, float(jnp.abs(b.astype(jnp.float32)).max()))
        chex.assert_trees_all_close(a.astype(jnp.float32), b.astype(jnp.float32),
                                    atol=tol * scale, rtol=0, custom_message=name)
    return got


@KERNELS
@pytest.mark.parametrize("name", ["straddle_empty", "trailing"])
def test_kernel_f32_matches_reference(impl, name):
    out = _check_against_reference(impl, SIZES[name], tiles=TILES[impl])[0]
    assert not np.asarray(out)[sum(SIZES[name]):].any()  # trailing rows exactly 0


@KERNELS_TPU_SLOW
def test_kernel_one_group_and_all_trailing(impl):
    _check_against_reference(impl, SIZES["one_group"], tiles=TILES[impl])
    lhs, rhs, dout = _inputs()
    gs = jnp.array(SIZES["none"], jnp.int32)
    y, dlhs, drhs, t = _fwd_bwd(impl, lhs, rhs, dout, gs, tiles=TILES[impl])
    for x in (y, dlhs, drhs, t):
        np.testing.assert_array_equal(x, 0.0)


@KERNELS_TPU_SLOW
def test_kernel_bf16_odd_shapes_default_tiles(impl):
    """bf16, M/K/N multiples of no tile, default tiles (fitted to the problem): loose."""
    _check_against_reference(impl, [7, 0, 11, 15], m=37, k=20, n=24, dtype=jnp.bfloat16,
                             tiles=None, tol=2e-2)


@KERNELS_TPU_SLOW
def test_kernel_odd_shapes_small_tiles_and_preferred_dtype(impl):
    """f32 output from bf16 inputs; K, N cut by the tiles (GPU: masked, TPU: padded)."""
    _check_against_reference(impl, [9, 14, 0, 3], m=40, k=20, n=24, dtype=jnp.bfloat16,
                             tiles=TILES[impl], tol=2e-2, preferred=jnp.float32)


@KERNELS_TPU_SLOW
def test_kernel_rows_cut_by_the_tile_but_not_k_or_n(impl):
    """One masked dimension at a time (M = 28: rows masked/padded; K, N whole tiles),
    with blocks of three different sizes."""
    tiles = {"pallas_gpu": gpu.Tiles(block_m=32, block_k=16, block_n=64, group_m=1),
             "pallas_tpu": tpu.Tiles(block_m=16, block_k=32, block_n=64)}[impl]
    _check_against_reference(impl, [6, 13, 0, 9], m=28, k=32, n=64, tiles=tiles)


def test_kernel_from_the_default_impl_picks_interpret_mode():
    """`impl="pallas_gpu"` on CPU runs by itself (interpret mode chosen by the kernel)."""
    lhs, rhs, _ = _inputs(m=16, k=16, n=16, g=2)
    gs = jnp.array([5, 8], jnp.int32)
    np.testing.assert_allclose(api.gmm(lhs, rhs, gs, impl="pallas_gpu"),
                               np_gmm(lhs, rhs, [5, 8]), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- errors
def _bad_calls():
    lhs, rhs, dout = _inputs(m=8, k=4, n=4, g=2)
    gs = jnp.array([3, 4], jnp.int32)
    yield "impl", lambda: api.gmm(lhs, rhs, gs, impl="triton")
    yield "impl", lambda: api.tgmm(lhs, dout, gs, impl="cuda")
    yield "lhs", lambda: api.gmm(lhs[0], rhs, gs)
    yield "lhs.dtype", lambda: api.gmm(lhs.astype(jnp.int32), rhs, gs)
    yield "rhs", lambda: api.gmm(lhs, rhs[0], gs)
    yield "rhs", lambda: api.gmm(lhs, rhs[:, :3], gs)
    yield "rhs.dtype", lambda: api.gmm(lhs, rhs.astype(jnp.int8), gs)
    yield "group_sizes", lambda: api.gmm(lhs, rhs, gs[None])
    yield "group_sizes", lambda: api.gmm(lhs, rhs, jnp.array([3, 4, 1], jnp.int32))
    yield "group_sizes.dtype", lambda: api.gmm(lhs, rhs, gs.astype(jnp.float32))
    yield "group_sizes", lambda: api.gmm(lhs, rhs, jnp.array([-1, 4], jnp.int32))
    yield "group_sizes", lambda: api.gmm(lhs, rhs, jnp.array([5, 4], jnp.int32))
    yield "group_sizes", lambda: api.tgmm(lhs, dout, jnp.array([5, 4], jnp.int32))
    yield "preferred_element_type", lambda: api.gmm(lhs, rhs, gs, preferred_element_type=jnp.int32)
    yield "tiles", lambda: api.gmm(lhs, rhs, gs, impl="pallas_gpu", tiles=TILES["pallas_tpu"])
    yield "tiles", lambda: api.gmm(lhs, rhs, gs, impl="pallas_tpu", tiles=(16, 16, 16))
    yield "dout", lambda: api.tgmm(lhs, dout[:5], gs)
    yield "dout.dtype", lambda: api.tgmm(lhs, dout.astype(jnp.int32), gs)
    yield "Tiles.block_m", lambda: gpu.Tiles(block_m=48)
    yield "Tiles.block_k", lambda: gpu.Tiles(block_k=8)
    yield "Tiles.num_warps", lambda: gpu.Tiles(num_warps=3)
    yield "Tiles.num_stages", lambda: gpu.Tiles(num_stages=0)
    yield "Tiles.group_m", lambda: gpu.Tiles(group_m=0)
    yield "Tiles.block_n", lambda: tpu.Tiles(block_n=100)


@pytest.mark.parametrize("case", range(len(list(_bad_calls()))))
def test_bad_arguments_raise_value_error_naming_them(case):
    field, call = list(_bad_calls())[case]
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        call()


def test_traced_group_sizes_are_not_checked_but_clipped():
    """Under jit the sizes are unknown: no check, and every impl clips the same way."""
    lhs, rhs, _ = _inputs(m=16, k=16, n=16, g=2)
    gs = jnp.array([-3, 30], jnp.int32)  # clipped: group 0 empty, group 1 = all 16 rows
    want = np_gmm(lhs, rhs, [0, 16])
    for impl in ("reference", "pallas_gpu"):
        got = jax.jit(functools.partial(api.gmm, impl=impl))(lhs, rhs, gs)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_tpu_tiling_is_checked_when_compiled():
    """Mosaic needs 128-lane blocks: a compiled call (interpret=False) refuses others."""
    lhs, rhs, _ = _inputs(m=64, k=256, n=256, g=2)
    with pytest.raises(ValueError, match="Tiles.block_k"):
        tpu.gmm(lhs, rhs, jnp.array([30, 34], jnp.int32), tiles=tpu.Tiles(64, 64, 128),
                interpret=False)
