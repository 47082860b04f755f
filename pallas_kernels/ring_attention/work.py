"""Work per device of the ring: how many attention tiles each device computes.

A flash kernel computes a (query block, key block) tile only if some pair in it is
unmasked. Summing those tiles over the N blocks a device sees in the ring gives its
work; the ring's step time is set by the busiest device, so max/mean is the slowdown
from imbalance. With a causal mask, contiguous layout: device d has d full blocks plus
a triangle (max/mean -> 2N/(N+1)); striped: every device has N near-triangles (~1).

    >>> counts = tile_counts(1024, 8, "striped", block=16, causal=True)
    >>> float(counts.max() / counts.mean())
    1.0
"""
from __future__ import annotations

import numpy as np

from pallas_kernels.flash_attention.reference import attention_mask
from pallas_kernels.ring_attention.layout import layout_positions


def tile_counts(seq_len: int, n: int, layout: str, *, block: int, causal: bool,
                sliding_window: int | None = None, stripe: int = 1) -> np.ndarray:
    """Tiles with at least one unmasked pair, per device: int [n].

    Args:
      seq_len: total tokens T (one sequence, no padding).
      n: ring size.
      layout: "striped" or "contiguous".
      block: tile edge (query and key block size of the kernel); divides T / n.
      causal, sliding_window: the mask.
      stripe: striped layout granularity.
    """
    local = seq_len // n
    if seq_len % n or local % block:
        raise ValueError(f"{seq_len=} must split into {n=} shards of whole {block=} tiles")
    pos = layout_positions(seq_len, n, layout, stripe).reshape(n, 1, local)  # [device, 1, T/N]
    counts = np.zeros(n, dtype=np.int64)
    for d in range(n):
        for e in range(n):  # every block visits every device once
            mask = np.asarray(attention_mask(1, local, local, causal=causal,
                                             sliding_window=sliding_window,
                                             q_positions=pos[d], kv_positions=pos[e]))[0, 0]
            tiles = mask.reshape(local // block, block, local // block, block).any(axis=(1, 3))
            counts[d] += int(tiles.sum())
    return counts
