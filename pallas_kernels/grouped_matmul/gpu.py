"""Grouped matmul for NVIDIA GPUs in Pallas (Triton lowering): gmm and tgmm kernels.

gmm (MegaBlocks, Gale et al. 2022, https://arxiv.org/abs/2211.15841): a static-length
list of work items, computed in jnp inside the jitted call from the group sizes
(schedule.py): one item per (group, m-tile) that the group overlaps, plus the items of
the trailing rows past sum(group_sizes), which write zeros, padded to
num_m_tiles + G with no-op items. A program takes one (item, n-tile): it loops over K
in chunks of block_k, accumulating lhs[tile rows, chunk] @ rhs[group][chunk, n-tile]
in f32, and stores only the rows of its group with a masked store, straight to the
output in global memory, because the two groups that share a boundary tile write
different rows of the same output tile. Every output row is written exactly once.

Launch order: the programs run n-tile fastest, `group_m` items at a time (the L2
"grouped ordering" of Triton's matmul tutorial), so a wave of programs re-reads a few
row tiles and the weights of a few groups from L2 instead of from memory.

tgmm (the weight gradient, [G, K, N]): a program per (n-tile, k-tile, group) loops over
its group's rows in chunks of block_m, from the group's first row (dynamic loop bounds
from the group offsets), masks rows past the group's end, and accumulates
lhs_chunkᵀ @ dout_chunk in f32. An empty group runs no iteration and stores zeros.

    import jax, jax.numpy as jnp
    from pallas_kernels.grouped_matmul import gpu
    lhs = jax.random.normal(jax.random.key(0), (40, 32)); rhs = jnp.ones((3, 32, 48))
    sizes = jnp.array([10, 0, 25], jnp.int32)     # rows 35..39 come back as 0
    out = gpu.gmm(lhs, rhs, sizes, tiles=gpu.Tiles(16, 16, 16))   # interpret mode on CPU

No tensor is padded: loads past M, K or N are masked (Triton tiles are powers of two
>= 16; blocks longer than the problem shrink to it). These functions have no gradient
of their own; `pallas_kernels.grouped_matmul.gmm` differentiates them.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.grouped_matmul import api, schedule
from pallas_kernels.grouped_matmul.reference import group_bounds


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile sizes and Triton launch parameters (they change speed, not results).

    Attributes:
      block_m: rows per tile (gmm), rows per loop step (tgmm).
      block_k: contraction chunk per loop step (gmm), output rows of a tile (tgmm).
      block_n: output columns of a tile (both).
      group_m: gmm items launched together over all n-tiles (L2 reuse of rows/weights).
      num_warps, num_stages: Triton launch parameters of both kernels.
    Blocks are powers of two >= 16 (Triton's dot needs that); a block longer than its
    dimension shrinks to the dimension's next power of two.
    """

    block_m: int = 128
    block_k: int = 64
    block_n: int = 128
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 4

    def __post_init__(self):
        for name in ("block_m", "block_k", "block_n"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ValueError(f"Tiles.{name}={value!r} must be a power of two >= 16")
        if not isinstance(self.group_m, int) or self.group_m < 1:
            raise ValueError(f"Tiles.group_m={self.group_m!r} must be a positive int")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"Tiles.num_warps={self.num_warps!r} must be one of 1, 2, 4, 8, 16")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"Tiles.num_stages={self.num_stages!r} must be a positive int")

    def fit(self, m: int, k: int, n: int) -> "Tiles":
        """Blocks capped at the (power-of-two rounded) problem dimensions."""
        def cap(block, dim):
            return max(16, min(block, _next_pow2(dim)))
        return dataclasses.replace(self, block_m=cap(self.block_m, m),
                                   block_k=cap(self.block_k, k), block_n=cap(self.block_n, n))


# The tiles a call gets when it names none: one set per kernel, from the tile sweeps on an
# H200 (`bench/grouped_matmul.py --sweep`, bench/results/grouped_matmul.md, 2026-12-03/04).
# gmm (the forward and the lhs gradient): 128 x 64 x 256, 8 warps, 3 stages. 128-row tiles
# waste less on the partly filled last tile of each group than 256-row ones (Zipf sizes,
# 128 experts: 350 -> 428 TFLOP/s forward), and 256 columns keep the tile as large; at
# 8-64 balanced experts it is within 1-5% of 256 x 64 x 128. tgmm streams two [block_m, .]
# tiles per stage, so large tiles overflow its shared memory; 128 x 128 x 128, 8 warps,
# 3 stages was the best of the sweep for the forward+backward with one set of tiles.
GMM_TILES = Tiles(block_m=128, block_k=64, block_n=256, num_warps=8, num_stages=3)
TGMM_TILES = Tiles(block_m=128, block_k=128, block_n=128, num_warps=8, num_stages=3)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static (hashable) description of one kernel call."""

    m: int
    k: int  # contraction length
    n: int  # output columns
    tiles: Tiles
    transpose_rhs: bool = False  # rhs is [G, N, K] (gmm's lhs gradient: dout @ rhs_gᵀ)

    @property
    def k_tiles(self) -> int:
        return -(-self.k // self.tiles.block_k)

    @property
    def n_tiles(self) -> int:
        return -(-self.n // self.tiles.block_n)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _default_interpret() -> bool:
    return jax.default_backend() not in ("gpu", "cuda")


def _span(start, size: int, limit: int, check: bool):
    """Indices start + [0, size) and, when `check`, the mask of those < limit (else None)."""
    idx = start + jnp.arange(size, dtype=jnp.int32)
    return idx, (idx < limit) if check else None


def _both(a, b, shape):
    """The `shape` mask of optional row mask a and column mask b (None: all true)."""
    if a is None and b is None:
        return None
    a = jnp.ones(shape[:1], jnp.bool_) if a is None else a
    b = jnp.ones(shape[1:], jnp.bool_) if b is None else b
    return a[:, None] & b[None, :]


def _load(ref, mask):
    return plgpu.load(ref) if mask is None else plgpu.load(ref, mask=mask, other=0)


# ----------------------------------------------------------------------------- gmm
def _item_and_n(pid, *, num_items: int, n_tiles: int, group_m: int):
    """Program id -> (item, n-tile): n fastest within a band of `group_m` items."""
    per_band = group_m * n_tiles
    first = (pid // per_band) * group_m
    band = jnp.minimum(num_items - first, group_m)  # the last band may be narrower
    local = pid % per_band
    return first + local % band, local // band


def _gmm_kernel(meta_ref, lhs_ref, rhs_ref, out_ref, *, cfg: _Config, num_items: int):
    """One (item, n-tile): out[rows of the item's group in its tile, n-tile]."""
    t = cfg.tiles
    bm, bk, bn = t.block_m, t.block_k, t.block_n
    group, lo, hi, tile = meta_ref[0], meta_ref[1], meta_ref[2], meta_ref[3]
    _, n_i = _item_and_n(pl.program_id(0), num_items=num_items, n_tiles=cfg.n_tiles,
                         group_m=t.group_m)
    row0, col0 = tile * bm, n_i * bn
    rows, row_ok = _span(row0, bm, cfg.m, cfg.m % bm != 0)
    _, col_ok = _span(col0, bn, cfg.n, cfg.n % bn != 0)
    g = jnp.maximum(group, 0)  # -1: the trailing rows, which get no product
    row_span, col_span = pl.ds(row0, bm), pl.ds(col0, bn)

    def body(kk, acc):  # acc [bm, bn] f32 += lhs[rows, chunk] @ rhs_g[chunk, cols]
        k0 = kk * bk
        _, k_ok = _span(k0, bk, cfg.k, cfg.k % bk != 0)
        a = _load(lhs_ref.at[row_span, pl.ds(k0, bk)], _both(row_ok, k_ok, (bm, bk)))
        if cfg.transpose_rhs:  # rhs_g is [N, K]: the tile [bn, bk], transposed in the dot
            b = _load(rhs_ref.at[g, col_span, pl.ds(k0, bk)], _both(col_ok, k_ok, (bn, bk)))
            return acc + plgpu.dot(a, b, trans_b=True)
        b = _load(rhs_ref.at[g, pl.ds(k0, bk), col_span], _both(k_ok, col_ok, (bk, bn)))
        return acc + plgpu.dot(a, b)

    # Bounds of one integer type: Triton's scf.for refuses mixed ones (a weak Python int
    # beside a loaded int32).
    steps = jnp.where(group >= 0, jnp.int32(cfg.k_tiles), jnp.int32(0)).astype(jnp.int32)
    acc = jax.lax.fori_loop(jnp.int32(0), steps, body, jnp.zeros((bm, bn), jnp.float32))
    mine = (rows >= lo) & (rows < hi)  # this group's rows only (a padding item: none)
    plgpu.store(out_ref.at[row_span, col_span], acc.astype(out_ref.dtype),
                mask=_both(mine, col_ok, (bm, bn)))


def gmm(lhs, rhs, group_sizes, *, transpose_rhs: bool = False, out_dtype=None,
        tiles: Tiles | None = None, interpret: bool | None = None):
    """lhs [M, K] @ rhs[g] per group -> [M, N]; rows past sum(group_sizes) are 0.

    rhs is [G, K, N], or [G, N, K] with `transpose_rhs` (then lhs_g @ rhs_gᵀ). lhs and
    rhs share a dtype; f32 accumulation; output `out_dtype` (default lhs's).
    `interpret=None` picks Pallas interpret mode off a GPU.
    """
    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    cfg = _Config(m=m, k=k, n=n, tiles=(tiles or GMM_TILES).fit(m, k, n),
                  transpose_rhs=transpose_rhs)
    t = cfg.tiles
    s = schedule.make_schedule(group_sizes, m, t.block_m, zero_trailing=True)
    num_items = s.group_ids.shape[0]
    g = rhs.shape[0]
    rhs_group = jnp.where(s.group_ids < g, s.group_ids, -1)  # -1: write zeros, no product
    meta = jnp.stack([rhs_group, s.row_lo, s.row_hi, s.m_tile_ids], axis=1)  # [L, 4] int32
    item = functools.partial(_item_and_n, num_items=num_items, n_tiles=cfg.n_tiles,
                             group_m=t.group_m)
    name = f"gmm_bm{t.block_m}_bk{t.block_k}_bn{t.block_n}" + ("_rhsT" if transpose_rhs else "")
    with jax.named_scope(name):
        return pl.pallas_call(
            functools.partial(_gmm_kernel, cfg=cfg, num_items=num_items),
            grid=(num_items * cfg.n_tiles,),
            in_specs=[
                pl.BlockSpec((None, 4), lambda pid: (item(pid)[0], 0)),  # this item's meta
                pl.BlockSpec(lhs.shape, lambda pid: (0, 0)),  # whole arrays: masked loads
                pl.BlockSpec(rhs.shape, lambda pid: (0, 0, 0)),
            ],
            out_specs=pl.BlockSpec((m, n), lambda pid: (0, 0)),
            out_shape=jax.ShapeDtypeStruct((m, n), out_dtype or lhs.dtype),
            compiler_params=plgpu.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages),
            interpret=_default_interpret() if interpret is None else interpret,
            cost_estimate=pl.CostEstimate(
                flops=2 * m * k * n, transcendentals=0,
                bytes_accessed=(lhs.size * cfg.n_tiles + rhs.size + m * n) * lhs.dtype.itemsize),
            name=name,
        )(meta, lhs, rhs)


# ----------------------------------------------------------------------------- tgmm
def _tgmm_kernel(bounds_ref, lhs_ref, dout_ref, out_ref, *, cfg: _Config):
    """One (n-tile, k-tile, group): out[g, k-tile, n-tile] = lhs_gᵀ @ dout_g."""
    t = cfg.tiles
    bm, bk, bn = t.block_m, t.block_k, t.block_n
    n_i, k_i = pl.program_id(0), pl.program_id(1)
    lo, hi = bounds_ref[0], bounds_ref[1]
    _, k_ok = _span(k_i * bk, bk, cfg.k, cfg.k % bk != 0)
    _, n_ok = _span(n_i * bn, bn, cfg.n, cfg.n % bn != 0)
    k_span, n_span = pl.ds(k_i * bk, bk), pl.ds(n_i * bn, bn)

    def body(i, acc):  # acc [bk, bn] f32 += lhs[chunk, k-tile]ᵀ @ dout[chunk, n-tile]
        r0 = lo + i * bm
        _, row_ok = _span(r0, bm, hi, True)  # rows past the group's end count 0
        a = _load(lhs_ref.at[pl.ds(r0, bm), k_span], _both(row_ok, k_ok, (bm, bk)))
        b = _load(dout_ref.at[pl.ds(r0, bm), n_span], _both(row_ok, n_ok, (bm, bn)))
        return acc + plgpu.dot(a, b, trans_a=True)

    steps = ((hi - lo + bm - 1) // bm).astype(jnp.int32)  # 0 for an empty group: zeros
    acc = jax.lax.fori_loop(jnp.int32(0), steps, body, jnp.zeros((bk, bn), jnp.float32))
    plgpu.store(out_ref.at[k_span, n_span], acc.astype(out_ref.dtype),
                mask=_both(k_ok, n_ok, (bk, bn)))


def tgmm(lhs, dout, group_sizes, *, out_dtype=None, tiles: Tiles | None = None,
         interpret: bool | None = None):
    """Per group lhs_gᵀ @ dout_g: lhs [M, K], dout [M, N] -> [G, K, N] (zeros for an empty group)."""
    m, k = lhs.shape
    n = dout.shape[1]
    g = group_sizes.shape[0]
    cfg = _Config(m=m, k=k, n=n, tiles=(tiles or TGMM_TILES).fit(m, k, n))
    t = cfg.tiles
    starts, ends = group_bounds(group_sizes, m)
    bounds = jnp.stack([starts, ends], axis=1)  # [G, 2] int32
    name = f"tgmm_bm{t.block_m}_bk{t.block_k}_bn{t.block_n}"
    with jax.named_scope(name):
        return pl.pallas_call(
            functools.partial(_tgmm_kernel, cfg=cfg),
            grid=(cfg.n_tiles, cfg.k_tiles, g),  # n fastest: a group's programs run together
            in_specs=[
                pl.BlockSpec((None, 2), lambda ni, ki, gi: (gi, 0)),
                pl.BlockSpec(lhs.shape, lambda ni, ki, gi: (0, 0)),
                pl.BlockSpec(dout.shape, lambda ni, ki, gi: (0, 0)),
            ],
            out_specs=pl.BlockSpec((None, k, n), lambda ni, ki, gi: (gi, 0, 0)),
            out_shape=jax.ShapeDtypeStruct((g, k, n), out_dtype or lhs.dtype),
            compiler_params=plgpu.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages),
            interpret=_default_interpret() if interpret is None else interpret,
            cost_estimate=pl.CostEstimate(
                flops=2 * m * k * n, transcendentals=0,
                bytes_accessed=(lhs.size * cfg.n_tiles + dout.size * cfg.k_tiles + g * k * n)
                * lhs.dtype.itemsize),
            name=name,
        )(bounds, lhs, dout)


api.register_backend("pallas_gpu", api.Kernels(gmm=gmm, tgmm=tgmm, tiles=Tiles))
