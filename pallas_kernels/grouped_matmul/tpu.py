"""Grouped matmul for TPUs in Pallas (Mosaic lowering), megablox-style: gmm and tgmm.

The grid walks the work items of schedule.py, (group, m-tile) pairs in group order, with
their ids and row bounds *scalar-prefetched* into SMEM (`pltpu.PrefetchScalarGridSpec`),
so the BlockSpec index maps pick each step's lhs tile, rhs group and output tile from
them (MegaBlocks, Gale et al. 2022, as jax's `pallas/ops/tpu/megablox/gmm.py` does it).
The grid has as many item steps as there are real items (a traced grid size), so no
padding item runs.

gmm: grid (n-tiles, items, k-tiles), k innermost. A step adds lhs_tile @ rhs[group]
chunk into an f32 VMEM accumulator; at the last k-step the rows of the item's group
are selected into the output tile (`where(mask, acc, out)`). An m-tile that straddles
two groups is visited by both items on consecutive steps, so the output tile stays in
VMEM between them and each writes its own rows. The rows past sum(group_sizes) are the
items of a trailing group that compute nothing and write zeros; their steps keep the
previous lhs/rhs blocks (k index pinned), so they cost no weight DMA.

tgmm: grid (n-tiles, k-tiles, items), items innermost. The accumulator [block_k, block_n]
is zeroed when the group changes, adds the masked lhs_tileᵀ @ dout_tile of each of the
group's items, and is stored to out[group] when the next item belongs to another group.
An empty group gets one item that adds nothing, so its output is written as zeros.

    import jax, jax.numpy as jnp
    from pallas_kernels.grouped_matmul import tpu
    lhs = jax.random.normal(jax.random.key(0), (40, 32)); rhs = jnp.ones((3, 32, 48))
    out = tpu.gmm(lhs, rhs, jnp.array([10, 0, 25], jnp.int32), tiles=tpu.Tiles(16, 16, 16))

Dimensions that are not multiples of their tile are zero-padded (a copy; the MoE widths
are multiples of 128 and need none). Off TPU the kernels run in Pallas TPU interpret
mode (`pltpu.InterpretParams()`). These functions have no gradient of their own;
`pallas_kernels.grouped_matmul.gmm` differentiates them.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.grouped_matmul import api, schedule

NUM_LANES = 128
_NN = (((1,), (0,)), ((), ()))  # a @ b
_NT = (((1,), (1,)), ((), ()))  # a @ b.T


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile sizes (they change speed, not results).

    Attributes:
      block_m: rows per tile (both kernels).
      block_k: contraction chunk (gmm) / output rows (tgmm).
      block_n: output columns (both).
    On TPU block_k and block_n must be multiples of 128 (lanes) and block_m of 8 (16 for
    16-bit data), unless a block covers its whole dimension; a block longer than its
    dimension shrinks to it. Interpret mode takes any multiple of 8, so tests use tiny
    tiles. Defaults are large because a grid step costs ~0.35 us: not tuned on a TPU.
    """

    block_m: int = 512
    block_k: int = 512
    block_n: int = 512

    def __post_init__(self):
        for name in ("block_m", "block_k", "block_n"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0 or value % 8:
                raise ValueError(f"Tiles.{name}={value!r} must be a positive multiple of 8")

    def fit(self, m: int, k: int, n: int) -> tuple[int, int, int]:
        """(tm, tk, tn): a block longer than its dimension becomes the whole dimension
        (a whole-dimension block is legal on TPU at any size)."""
        return min(self.block_m, m), min(self.block_k, k), min(self.block_n, n)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _default_interpret():
    return False if jax.default_backend() == "tpu" else pltpu.InterpretParams()


def _check_tpu_tiling(blocks, dtype, m: int, k: int, n: int) -> None:
    """Compiled Mosaic needs (8, 128)-aligned blocks (16 rows for 16-bit data)."""
    tm, tk, tn = blocks
    rows = 8 * 4 // min(jnp.dtype(dtype).itemsize, 4)
    if tm % rows and tm != m:
        raise ValueError(f"Tiles.block_m={tm} must be a multiple of {rows} for {dtype} "
                         f"on TPU (or cover all {m} rows)")
    for name, block, dim in (("block_k", tk, k), ("block_n", tn, n)):
        if block % NUM_LANES and block != dim:
            raise ValueError(f"Tiles.{name}={block} must be a multiple of {NUM_LANES} on TPU "
                             f"(or cover the whole dimension {dim})")


def _prepare(tiles, interpret, dtype, m, k, n):
    """(tm, tk, tn) fitted to the problem, and the interpret argument."""
    blocks = (tiles or Tiles()).fit(m, k, n)
    interpret = _default_interpret() if interpret is None else interpret
    if not interpret:
        _check_tpu_tiling(blocks, dtype, m, k, n)
    return blocks, interpret


def _pad_to(x, shape):
    """Zero-pad x at the end of each dimension to `shape` (no copy when it already fits)."""
    if x.shape == tuple(shape):
        return x
    return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape, strict=True)])


# ----------------------------------------------------------------------------- gmm
def _gmm_kernel(group_ids, m_tile_ids, row_lo, row_hi, lhs_ref, rhs_ref, out_ref, acc_ref, *,
                num_groups: int, k_tiles: int, transpose_rhs: bool):
    i, kk = pl.program_id(1), pl.program_id(2)

    @pl.when(kk == 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(group_ids[i] < num_groups)  # the trailing rows' items add nothing
    def _accumulate():
        dims = _NT if transpose_rhs else _NN
        acc_ref[...] += lax.dot_general(lhs_ref[...], rhs_ref[...], dims,
                                        preferred_element_type=jnp.float32)

    @pl.when(kk == k_tiles - 1)
    def _store():  # this group's rows of the tile; the other rows are another item's
        tm, tn = acc_ref.shape
        rows = m_tile_ids[i] * tm + lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
        mine = (rows >= row_lo[i]) & (rows < row_hi[i])
        out_ref[...] = jnp.where(mine, acc_ref[...],
                                 out_ref[...].astype(jnp.float32)).astype(out_ref.dtype)


def gmm(lhs, rhs, group_sizes, *, transpose_rhs: bool = False, out_dtype=None,
        tiles: Tiles | None = None, interpret=None):
    """lhs [M, K] @ rhs[g] per group -> [M, N]; rows past sum(group_sizes) are 0.

    rhs is [G, K, N], or [G, N, K] with `transpose_rhs` (lhs_g @ rhs_gᵀ). lhs and rhs
    share a dtype; f32 accumulation; output `out_dtype` (default lhs's).
    """
    m, k = lhs.shape
    g = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out_dtype = out_dtype or lhs.dtype
    (tm, tk, tn), interpret = _prepare(tiles, interpret, lhs.dtype, m, k, n)
    mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
    lhs = _pad_to(lhs, (mp, kp))
    rhs = _pad_to(rhs, (g, np_, kp) if transpose_rhs else (g, kp, np_))
    k_tiles, n_tiles = kp // tk, np_ // tn
    s = schedule.make_schedule(group_sizes, m, tm, zero_trailing=True)

    def k_of(kk, i, gids):  # the trailing items keep the last k block: no new DMA
        return jnp.where(gids[i] < g, kk, k_tiles - 1)

    def lhs_map(nn, i, kk, gids, tiles_, lo, hi):
        return tiles_[i], k_of(kk, i, gids)

    def rhs_map(nn, i, kk, gids, tiles_, lo, hi):
        rows = jnp.minimum(gids[i], g - 1)
        return (rows, nn, k_of(kk, i, gids)) if transpose_rhs else (rows, k_of(kk, i, gids), nn)

    def out_map(nn, i, kk, gids, tiles_, lo, hi):
        return tiles_[i], nn

    rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
    name = f"gmm_tpu_tm{tm}_tk{tk}_tn{tn}" + ("_rhsT" if transpose_rhs else "")
    with jax.named_scope(name):
        out = pl.pallas_call(
            functools.partial(_gmm_kernel, num_groups=g, k_tiles=k_tiles,
                              transpose_rhs=transpose_rhs),
            out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=4,
                grid=(n_tiles, s.num_items, k_tiles),
                in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
                out_specs=pl.BlockSpec((tm, tn), out_map),
                scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
            ),
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "arbitrary", "arbitrary")),
            interpret=interpret,
            cost_estimate=pl.CostEstimate(
                flops=2 * m * k * n, transcendentals=0,
                bytes_accessed=(lhs.size * n_tiles + rhs.size + mp * np_) * lhs.dtype.itemsize),
            name=name,
        )(s.group_ids, s.m_tile_ids, s.row_lo, s.row_hi, lhs, rhs)
    return out[:m, :n]


# ----------------------------------------------------------------------------- tgmm
def _tgmm_kernel(group_ids, m_tile_ids, row_lo, row_hi, lhs_ref, dout_ref, out_ref, acc_ref):
    i = pl.program_id(2)
    last = pl.num_programs(2) - 1
    group = group_ids[i]
    first_of_group = (i == 0) | (group_ids[jnp.maximum(i - 1, 0)] != group)
    last_of_group = (i == last) | (group_ids[jnp.minimum(i + 1, last)] != group)

    @pl.when(first_of_group)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(row_hi[i] > row_lo[i])  # an empty group's item adds nothing
    def _accumulate():
        tm = lhs_ref.shape[0]
        rows = m_tile_ids[i] * tm + lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
        mine = (rows >= row_lo[i]) & (rows < row_hi[i])  # [tm, 1]
        x = jnp.where(mine, lhs_ref[...].astype(jnp.float32), 0.0)  # [tm, tk]
        dy = jnp.where(mine, dout_ref[...].astype(jnp.float32), 0.0)  # [tm, tn]
        acc_ref[...] += lax.dot(x.swapaxes(0, 1).astype(lhs_ref.dtype), dy.astype(dout_ref.dtype),
                                preferred_element_type=jnp.float32)

    @pl.when(last_of_group)
    def _store():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(lhs, dout, group_sizes, *, out_dtype=None, tiles: Tiles | None = None, interpret=None):
    """Per group lhs_gᵀ @ dout_g: lhs [M, K], dout [M, N] -> [G, K, N] (zeros for an empty group)."""
    m, k = lhs.shape
    n = dout.shape[1]
    g = group_sizes.shape[0]
    out_dtype = out_dtype or lhs.dtype
    (tm, tk, tn), interpret = _prepare(tiles, interpret, lhs.dtype, m, k, n)
    mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
    lhs, dout = _pad_to(lhs, (mp, kp)), _pad_to(dout, (mp, np_))
    k_tiles, n_tiles = kp // tk, np_ // tn
    s = schedule.make_schedule(group_sizes, m, tm, visit_empty=True)

    def lhs_map(nn, kk, i, gids, tiles_, lo, hi):
        return tiles_[i], kk

    def dout_map(nn, kk, i, gids, tiles_, lo, hi):
        return tiles_[i], nn

    def out_map(nn, kk, i, gids, tiles_, lo, hi):
        return gids[i], kk, nn

    name = f"tgmm_tpu_tm{tm}_tk{tk}_tn{tn}"
    with jax.named_scope(name):
        out = pl.pallas_call(
            _tgmm_kernel,
            out_shape=jax.ShapeDtypeStruct((g, kp, np_), out_dtype),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=4,
                grid=(n_tiles, k_tiles, s.num_items),
                in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), dout_map)],
                out_specs=pl.BlockSpec((None, tk, tn), out_map),
                scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
            ),
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "arbitrary", "arbitrary")),
            interpret=interpret,
            cost_estimate=pl.CostEstimate(
                flops=2 * m * k * n, transcendentals=0,
                bytes_accessed=(lhs.size * n_tiles + dout.size * k_tiles + g * kp * np_)
                * lhs.dtype.itemsize),
            name=name,
        )(s.group_ids, s.m_tile_ids, s.row_lo, s.row_hi, lhs, dout)
    return out[:, :k, :n]


api.register_backend("pallas_tpu", api.Kernels(gmm=gmm, tgmm=tgmm, tiles=Tiles))
