"""Which (query block, key block) tiles of an attention mask a flash kernel must visit.

FlashAttention-2 (Dao, 2023, https://arxiv.org/abs/2307.08691) skips tiles that the
causal mask hides entirely. Here the same idea covers every mask of reference.py —
causal, sliding window, segment ids — with arbitrary per-token positions (ring and
striped attention pass global positions), by comparing each block's min/max position
and min/max segment id:

  * a tile is *needed* when some (query, key) pair in it might be kept;
  * a tile is *full* when every pair in it is kept, so the kernel may skip the
    element-wise mask there (the fast inner loop).

For each row of tiles (a query block in the forward and dq kernels; a key block in
the dk/dv kernel) the kernel visits the contiguous span `[lo, hi)` of blocks from the
first to the last needed one, in three phases: masked `[lo, full_lo)`, unmasked
`[full_lo, full_hi)`, masked `[full_hi, hi)`. Blocks inside the span that are not
needed are computed under the mask, which is correct, only not free.

    >>> import jax.numpy as jnp
    >>> pos = jnp.arange(8, dtype=jnp.int32)[None]           # [B=1, T=8]
    >>> spans = block_spans(pos, pos, None, None, causal=True, sliding_window=None,
    ...                     block_q=4, block_k=4, q_len=8, kv_len=8, over="kv")
    >>> spans[0].tolist()   # per query block: [lo, full_lo, full_hi, hi]
    [[0, 1, 1, 1], [0, 0, 1, 2]]
"""
from __future__ import annotations

import jax.numpy as jnp


def _block_min_max(x, block: int):
    """Min and max over consecutive blocks of the last axis: [B, T] -> 2 x [B, T // block]."""
    b, t = x.shape
    xb = x.reshape(b, t // block, block)  # [B, num_blocks, block]
    return xb.min(axis=-1), xb.max(axis=-1)


def tile_masks(q_pos, kv_pos, q_seg, kv_seg, *, causal, sliding_window, block_q, block_k, q_len,
               kv_len):
    """Boolean [B, nq, nk] arrays (needed, full) from block-wise position/segment bounds.

    Args:
      q_pos, kv_pos: int32 [B, Tq], [B, Tk] positions, lengths multiples of the blocks.
        Padded tails must repeat a real position (edge padding) so bounds stay tight.
      q_seg, kv_seg: int32 segment ids of the same shapes, or None.
      q_len, kv_len: numbers of real queries and keys; the rest is padding.
    """
    q_lo, q_hi = _block_min_max(q_pos, block_q)
    k_lo, k_hi = _block_min_max(kv_pos, block_k)
    q_lo, q_hi = q_lo[:, :, None], q_hi[:, :, None]  # [B, nq, 1]
    k_lo, k_hi = k_lo[:, None, :], k_hi[:, None, :]  # [B, 1, nk]
    needed = jnp.ones(jnp.broadcast_shapes(q_lo.shape, k_lo.shape), dtype=bool)
    full = needed
    if causal:  # keep kv_pos <= q_pos
        needed = needed & (k_lo <= q_hi)
        full = full & (k_hi <= q_lo)
    if sliding_window is not None:  # keep q_pos - kv_pos < W (and kv_pos - q_pos < W)
        needed = needed & (q_lo - k_hi < sliding_window)
        full = full & (q_hi - k_lo < sliding_window)
        if not causal:
            needed = needed & (k_lo - q_hi < sliding_window)
            full = full & (k_hi - q_lo < sliding_window)
    if q_seg is not None:  # keep q_seg == kv_seg
        qs_lo, qs_hi = _block_min_max(q_seg, block_q)
        ks_lo, ks_hi = _block_min_max(kv_seg, block_k)
        qs_lo, qs_hi = qs_lo[:, :, None], qs_hi[:, :, None]
        ks_lo, ks_hi = ks_lo[:, None, :], ks_hi[:, None, :]
        needed = needed & (qs_lo <= ks_hi) & (ks_lo <= qs_hi)
        full = full & (qs_lo == qs_hi) & (ks_lo == ks_hi) & (qs_lo == ks_lo)
    # Padding: blocks of padded keys only are skipped, blocks holding some are masked;
    # blocks of padded queries only are skipped too (their rows are dropped).
    k_start = jnp.arange(k_lo.shape[-1]) * block_k
    needed = needed & (k_start < kv_len) & (jnp.arange(q_lo.shape[1]) * block_q < q_len)[:, None]
    full = full & (k_start + block_k <= kv_len)
    return needed, full & needed


def _spans(needed, full):
    """[lo, full_lo, full_hi, hi] along the last axis of [B, R, N] masks -> int32 [B, R, 4]."""
    n = needed.shape[-1]
    idx = jnp.arange(n, dtype=jnp.int32)
    any_needed = needed.any(axis=-1)
    lo = jnp.where(any_needed, jnp.argmax(needed, axis=-1), 0).astype(jnp.int32)
    hi = jnp.where(any_needed, n - jnp.argmax(needed[..., ::-1], axis=-1), 0).astype(jnp.int32)
    any_full = full.any(axis=-1)
    full_lo = jnp.where(any_full, jnp.argmax(full, axis=-1), hi).astype(jnp.int32)
    # The run of full blocks that starts at full_lo ends at the first non-full block.
    after = (idx >= full_lo[..., None]) & ~full
    full_hi = jnp.where(any_full, jnp.min(jnp.where(after, idx, hi[..., None]), axis=-1), hi)
    full_hi = jnp.minimum(full_hi, hi).astype(jnp.int32)
    return jnp.stack([lo, full_lo, full_hi, hi], axis=-1)


def block_spans(q_pos, kv_pos, q_seg, kv_seg, *, causal, sliding_window, block_q, block_k,
                q_len, kv_len, over: str):
    """int32 [B, rows, 4] spans `[lo, full_lo, full_hi, hi]` of blocks to visit.

    over="kv": one row per query block, spans over key blocks (forward and dq kernels).
    over="q":  one row per key block, spans over query blocks (dk/dv kernel).
    """
    if over not in ("kv", "q"):
        raise ValueError(f"{over=} must be 'kv' or 'q'")
    needed, full = tile_masks(q_pos, kv_pos, q_seg, kv_seg, causal=causal,
                              sliding_window=sliding_window, block_q=block_q,
                              block_k=block_k, q_len=q_len, kv_len=kv_len)
    if over == "q":
        needed, full = jnp.swapaxes(needed, 1, 2), jnp.swapaxes(full, 1, 2)
    return _spans(needed, full)
