"""Which query/key pairs the TPU flash-attention kernels keep: per element, and per block.

The rules are those of `reference.attention_mask` (causal, sliding window, segment ids,
on token positions). The kernels need them twice:

* per block, to skip work: before touching a (query block, key block) tile the kernel
  asks `block_is_live`, which compares the min/max position and segment id of the two
  blocks (`block_bounds`, computed once by XLA and prefetched into SMEM as scalars). The
  test is conservative: a live tile may still be fully masked, a dead one never holds a
  kept pair. Default positions give the usual causal/banded tile skipping; explicit
  positions (ring or striped attention) and packed documents get it for free. The index
  maps clamp the streamed block index into each row's first..last live tile
  (`live_range`), so skipped tiles outside that range cost no DMA either.
* per element, inside a live tile (`keep_mask`): positions come from `iota` when the
  caller gave none, or from position arrays; padded keys (the sequence rounded up to a
  whole block) are always dropped.

TPU layout: a tile of logits is [block_q, block_kv] with keys along the 128 lanes. So a
per-query vector is stored as a column repeated over the lanes ([B, Tq, 128], read
`ref[:, :1]` -> [block_q, 1]) and a per-key vector as a row repeated over the 8 sublanes
([B, 8, Tk], read `ref[:1, :]` -> [1, block_kv]); both broadcast against the tile, as in
jax's own TPU flash and splash attention kernels.

    import jax.numpy as jnp
    from pallas_kernels.flash_attention import tpu_mask
    spec = tpu_mask.MaskSpec(causal=True, sliding_window=None, has_segments=False,
                             has_positions=False, q_offset=0, kv_len=40, kv_padded_len=48)
    q_bounds = tpu_mask.block_bounds(jnp.arange(48)[None], None, block=16)  # [B=1, 3, 4]
    kv_bounds = tpu_mask.block_bounds(jnp.arange(48)[None], None, block=8)   # [1, 6, 4]
    live = tpu_mask.tile_liveness(spec, q_bounds, kv_bounds)  # [1, 3, 6], lower triangle
    tpu_mask.live_range(live)                                 # [1, 3, 2]: first, last live
"""
from __future__ import annotations

import dataclasses
import functools
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

NUM_LANES = 128  # minor dim of a TPU vector register
NUM_SUBLANES = 8  # second-minor dim
_BOUNDS = 4  # per block: min position, max position, min segment id, max segment id


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static description of the mask (hashable: it parameterises the kernels).

    Attributes:
      causal: keep key position <= query position.
      sliding_window: keep |query pos - key pos| < W (one-sided when causal), or None.
      has_segments: segment id arrays are passed; keep equal ids.
      has_positions: position arrays are passed; else query i sits at `q_offset + i`,
        key j at `j` (reference.default_positions).
      q_offset: default position of query 0 (kv_len - q_len: queries end-aligned).
      kv_len: true number of keys; keys at index >= kv_len are padding.
      kv_padded_len: keys after padding to a whole number of blocks.
    """

    causal: bool
    sliding_window: int | None
    has_segments: bool
    has_positions: bool
    q_offset: int
    kv_len: int
    kv_padded_len: int

    @property
    def uses_positions(self) -> bool:
        return self.causal or self.sliding_window is not None


class TokenRefs(NamedTuple):
    """Per-token inputs of one tile; an entry is None when the mask does not need it."""

    q_pos: object  # [block_q, 128] int32 (column repeated over lanes)
    kv_pos: object  # [8, block_kv] int32 (row repeated over sublanes)
    q_seg: object
    kv_seg: object


# ---------------------------------------------------------------- wrapper side (XLA)


def pad_to(x, length: int, axis: int = 1):
    """Pad `axis` to `length` by repeating the last entry (keeps block bounds tight)."""
    pad = length - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, mode="edge")


def as_query_column(x, padded_len: int):
    """[B, Tq] -> [B, Tq_padded, 128] int32, each value repeated over the lanes."""
    x = pad_to(x.astype(jnp.int32), padded_len)
    return jnp.broadcast_to(x[:, :, None], (*x.shape, NUM_LANES))


def as_key_row(x, padded_len: int):
    """[B, Tk] -> [B, 8, Tk_padded] int32, each value repeated over the sublanes."""
    x = pad_to(x.astype(jnp.int32), padded_len)
    return jnp.broadcast_to(x[:, None, :], (x.shape[0], NUM_SUBLANES, x.shape[1]))


def block_bounds(positions, segment_ids, block: int):
    """Min/max position and segment id of every block.

    Args:
      positions: [B, T_padded] int32, T_padded a multiple of `block`.
      segment_ids: [B, T_padded] int32 or None (then the segment bounds are 0).
      block: block length.

    Returns:
      [B, num_blocks, 4] int32: (min pos, max pos, min segment, max segment).
    """
    b, t = positions.shape
    pos = positions.reshape(b, t // block, block)  # [B, n, block]
    seg = jnp.zeros_like(pos) if segment_ids is None else segment_ids.reshape(pos.shape)
    bounds = jnp.stack([pos.min(-1), pos.max(-1), seg.min(-1), seg.max(-1)], axis=-1)
    return bounds.astype(jnp.int32)


def _may_interact(spec: MaskSpec, q, kv):
    """Whether tiles with bounds q, kv = (pos_lo, pos_hi, seg_lo, seg_hi) may hold a kept
    pair. Works on scalars (in the kernel) and on broadcasting arrays (in XLA)."""
    q_lo, q_hi, q_seg_lo, q_seg_hi = q
    kv_lo, kv_hi, kv_seg_lo, kv_seg_hi = kv
    conditions = []
    if spec.uses_positions:  # the tile's differences q - kv span [q_lo - kv_hi, q_hi - kv_lo]
        if spec.causal:
            conditions.append(q_hi - kv_lo >= 0)
        if spec.sliding_window is not None:
            conditions.append(q_lo - kv_hi < spec.sliding_window)
            if not spec.causal:
                conditions.append(kv_lo - q_hi < spec.sliding_window)
    if spec.has_segments:  # the two id ranges must overlap
        conditions.append((q_seg_lo <= kv_seg_hi) & (kv_seg_lo <= q_seg_hi))
    return functools.reduce(operator.and_, conditions) if conditions else True


def tile_liveness(spec: MaskSpec, q_bounds, kv_bounds):
    """[B, nq, 4], [B, nk, 4] block bounds -> [B, nq, nk] bool: tiles that may hold a kept pair."""
    live = _may_interact(spec, tuple(q_bounds[:, :, None, c] for c in range(_BOUNDS)),
                         tuple(kv_bounds[:, None, :, c] for c in range(_BOUNDS)))
    shape = (q_bounds.shape[0], q_bounds.shape[1], kv_bounds.shape[1])
    return jnp.broadcast_to(jnp.asarray(live), shape)


def live_range(live):
    """[..., n] bool -> [..., 2] int32: first and last live index ((0, 0) when none is).

    Index maps clamp the block index into this range, so on the skipped steps before
    the first live tile the first one is already being fetched, and after the last one
    the resident block is kept: no DMA is spent on skipped tiles outside the range.
    """
    n = live.shape[-1]
    index = jnp.arange(n, dtype=jnp.int32)
    first = jnp.min(jnp.where(live, index, n), axis=-1)
    last = jnp.max(jnp.where(live, index, -1), axis=-1)
    none = last < 0
    return jnp.stack([jnp.where(none, 0, first), jnp.where(none, 0, last)], -1).astype(jnp.int32)


# ---------------------------------------------------------------- kernel side (Mosaic)


def clamp_to_range(index, range_ref, row):
    """`index` clamped into row `row` of a flattened `live_range` table (in SMEM)."""
    return jnp.minimum(jnp.maximum(index, range_ref[2 * row]), range_ref[2 * row + 1])


def block_is_live(spec: MaskSpec, q_bounds_ref, kv_bounds_ref, *, batch, q_block, kv_block,
                  num_q_blocks, num_kv_blocks):
    """In the kernel: whether this tile may hold a kept pair (Python True if nothing masks).

    The bounds refs are flattened `block_bounds` in SMEM (1-D: SMEM pads 2-D arrays).
    """
    if not (spec.uses_positions or spec.has_segments):
        return True

    def bounds(ref, block, num_blocks):
        base = (batch * num_blocks + block) * _BOUNDS
        return tuple(ref[base + c] for c in range(_BOUNDS))

    return _may_interact(spec, bounds(q_bounds_ref, q_block, num_q_blocks),
                         bounds(kv_bounds_ref, kv_block, num_kv_blocks))


def keep_mask(spec: MaskSpec, refs: TokenRefs, *, q_block, kv_block, block_q: int,
              block_kv: int):
    """Boolean [block_q, block_kv] of kept pairs in this tile, or None when all are kept."""
    keep = None

    def both(m):
        return m if keep is None else keep & m

    kv_index = kv_block * block_kv + jax.lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
    if spec.uses_positions:
        if spec.has_positions:
            q_pos, kv_pos = refs.q_pos[:, :1], refs.kv_pos[:1, :]  # [bq, 1], [1, bkv]
        else:
            q_index = q_block * block_q + jax.lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
            q_pos, kv_pos = spec.q_offset + q_index, kv_index
        diff = q_pos - kv_pos  # [bq, bkv]
        if spec.causal:
            keep = both(diff >= 0)
        if spec.sliding_window is not None:
            keep = both(diff < spec.sliding_window)
            if not spec.causal:
                keep = both(-diff < spec.sliding_window)
    if spec.has_segments:
        keep = both(refs.q_seg[:, :1] == refs.kv_seg[:1, :])
    if spec.kv_padded_len != spec.kv_len:  # keys past the end are padding
        keep = both(jnp.broadcast_to(kv_index < spec.kv_len, (block_q, block_kv)))
    return keep


def when(condition):
    """`pl.when`, or an immediate call when the condition is statically true."""
    if condition is True:
        return lambda body: body()
    return pl.when(condition)
