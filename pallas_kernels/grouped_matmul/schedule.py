"""The work items of the grouped-matmul kernels: which (group, m-tile) pairs to visit.

Cut the M rows into tiles of `block_m`. A group of rows [start, end) overlaps the tiles
start // block_m ... (end - 1) // block_m; each overlap is one *work item*, and a kernel
program (GPU) or grid step (TPU) per item multiplies that tile's rows by the group's
weights and keeps only the rows in [start, end). Groups are consecutive, so neighbours
share at most their boundary tile, and the items of G groups number at most
num_m_tiles + G - 1 (MegaBlocks, Gale et al. 2022, https://arxiv.org/abs/2211.15841;
jax's megablox `make_group_metadata`). Items come in group order, so the m-tiles are
non-decreasing: the TPU kernel revisits an output tile only on consecutive steps.

gmm adds one more group, the *trailing* rows [sum(group_sizes), M), whose items write
zeros (so every output row is written exactly once per n-tile, and nothing needs a
zero-initialised output). tgmm instead visits an empty group once, so that its output
(zeros) is written. The arrays have a static length (the bound above), padded with
no-op items; `num_items` counts the real ones.

    import jax.numpy as jnp
    from pallas_kernels.grouped_matmul.schedule import make_schedule
    s = make_schedule(jnp.array([3, 0, 6], jnp.int32), 12, 4, zero_trailing=True)
    # group_ids  [0 2 2 2 3 4]   (3 = trailing rows 9..11, 4 = padding)
    # m_tile_ids [0 0 1 2 2 2],  row_lo [0 3 3 3 9 0],  row_hi [3 9 9 9 12 0],  num_items 5
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul.reference import group_bounds


class Schedule(NamedTuple):
    """Work items, each [L] int32 (L static), and the count of real ones (int32 scalar)."""

    group_ids: jax.Array  # 0..G-1: a group; G: trailing rows (write zeros); G+1: padding
    m_tile_ids: jax.Array  # the item's m-tile (rows m_tile * block_m ...)
    row_lo: jax.Array  # first row of the item's group
    row_hi: jax.Array  # one past its last row (row_lo == row_hi: writes nothing)
    num_items: jax.Array


def num_m_tiles(num_rows: int, block_m: int) -> int:
    return -(-num_rows // block_m)


def max_items(num_rows: int, num_groups: int, block_m: int, *, zero_trailing: bool) -> int:
    """Static length of the schedule: tiles + groups - 1, counting the trailing group."""
    return num_m_tiles(num_rows, block_m) + num_groups + int(zero_trailing) - 1


def make_schedule(group_sizes, num_rows: int, block_m: int, *, zero_trailing: bool = False,
                  visit_empty: bool = False) -> Schedule:
    """Work items of `group_sizes` [G] over `num_rows` rows in tiles of `block_m`.

    zero_trailing: add the items of the rows past sum(group_sizes) (group id G).
    visit_empty: give an empty group one item (with row_lo == row_hi), for tgmm.
    """
    g = group_sizes.shape[0]
    m_tiles = num_m_tiles(num_rows, block_m)
    length = max_items(num_rows, g, block_m, zero_trailing=zero_trailing)
    starts, ends = group_bounds(group_sizes, num_rows)
    if zero_trailing:  # the trailing rows as group G
        starts = jnp.append(starts, ends[-1])
        ends = jnp.append(ends, jnp.int32(num_rows))
    first_tile = starts // block_m
    overlapped = (ends - 1) // block_m - first_tile + 1
    counts = jnp.where(ends > starts, overlapped, 1 if visit_empty else 0)  # items per group
    item_ends = jnp.cumsum(counts)
    num_items = item_ends[-1]
    i = jnp.arange(length, dtype=jnp.int32)
    gid = jnp.searchsorted(item_ends, i, side="right").astype(jnp.int32)  # group of item i
    real = i < num_items
    gc = jnp.minimum(gid, starts.shape[0] - 1)
    tile = first_tile[gc] + i - (item_ends[gc] - counts[gc])
    return Schedule(
        group_ids=jnp.where(real, gid, g + 1),
        # An empty group at row M would start past the last tile: keep it in range.
        m_tile_ids=jnp.where(real, jnp.minimum(tile, m_tiles - 1), m_tiles - 1).astype(jnp.int32),
        row_lo=jnp.where(real, starts[gc], 0).astype(jnp.int32),
        row_hi=jnp.where(real, ends[gc], 0).astype(jnp.int32),
        num_items=num_items.astype(jnp.int32),
    )
