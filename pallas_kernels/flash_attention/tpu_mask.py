"""Which query/key pairs the TPU flash-attention kernels keep: per element, and per block.

The rules are those of `reference.attention_mask` (causal, sliding window, segment ids,
on token positions). The kernels need them twice:

* per block, to skip work: before touching a (query block, key block) tile the kernel
  asks `block_is_live`, which compares the min/max position and segment id of each block
  (`block_bounds`, computed once by XLA and prefetched into SMEM as scalars). The test
  is conservative: a live tile may still be fully masked, a dead one never holds a kept
  pair. Default positions make this the usual causal/banded tile skipping; explicit
  positions (ring or striped attention) and packed documents get it for free.
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
    pos = jnp.arange(48)[None]                                  # [B=1, T]
    tpu_mask.block_bounds(pos, None, block=16)                  # [1 * 3 blocks * 4]
"""
from __future__ import annotations

import dataclasses
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
    """Min/max position and segment id of every block, flattened for SMEM.

    Args:
      positions: [B, T_padded] int32, T_padded a multiple of `block`.
      segment_ids: [B, T_padded] int32 or None (then the segment bounds are 0).
      block: block length.

    Returns:
      [B * num_blocks * 4] int32; block n of batch b starts at (b * num_blocks + n) * 4.
      (1-D because SMEM pads 2-D arrays to (8, 128) tiles.)
    """
    b, t = positions.shape
    pos = positions.reshape(b, t // block, block)  # [B, n, block]
    seg = jnp.zeros_like(pos) if segment_ids is None else segment_ids.reshape(pos.shape)
    bounds = jnp.stack([pos.min(-1), pos.max(-1), seg.min(-1), seg.max(-1)], axis=-1)
    return bounds.astype(jnp.int32).reshape(-1)  # [B * n * 4]


# ---------------------------------------------------------------- kernel side (Mosaic)


def _bounds(ref, batch, block, num_blocks):
    base = (batch * num_blocks + block) * _BOUNDS
    return tuple(ref[base + c] for c in range(_BOUNDS))


def block_is_live(spec: MaskSpec, q_bounds_ref, kv_bounds_ref, *, batch, q_block, kv_block,
                  num_q_blocks, num_kv_blocks):
    """Whether the tile may hold a kept pair (scalar bool; Python True if nothing masks)."""
    if not (spec.uses_positions or spec.has_segments):
        return True
    q_lo, q_hi, q_seg_lo, q_seg_hi = _bounds(q_bounds_ref, batch, q_block, num_q_blocks)
    kv_lo, kv_hi, kv_seg_lo, kv_seg_hi = _bounds(kv_bounds_ref, batch, kv_block, num_kv_blocks)
    live = jnp.bool_(True)
    # The tile's position differences q - kv span [q_lo - kv_hi, q_hi - kv_lo].
    if spec.causal:
        live &= q_hi - kv_lo >= 0
    if spec.sliding_window is not None:
        live &= q_lo - kv_hi < spec.sliding_window
        if not spec.causal:
            live &= kv_lo - q_hi < spec.sliding_window
    if spec.has_segments:  # the two id ranges must overlap
        live &= (q_seg_lo <= kv_seg_hi) & (kv_seg_lo <= q_seg_hi)
    return live


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
