"""Cascade decode attention: a prefix shared by many sequences is read once per chunk
of sequences instead of once per sequence.

With a radix prefix cache (serving/radix.py) the sequences of a batch often share
their first pages physically, e.g. a few-shot prompt of thousands of tokens. Plain
paged decode attention still streams those pages once per sequence, and decode is
bound by that traffic. Softmax attention over a key set splits exactly into parts
over disjoint subsets, merged by their log-sum-exps (the split-K merge of gpu.py), so
decode attention becomes (Hydragen, Juravsky et al. 2024, https://arxiv.org/abs/2402.05099;
FlashInfer's cascade attention):

  * the shared prefix: the queries of `chunk` sequences become the query heads of one
    sequence (per kv head, chunk * G heads), so one kernel program reads each prefix
    page once for all of them;
  * each sequence's own pages (after the prefix), as usual;
  * one merge of the two partial outputs per query head.

Any `paged_attention` backend that returns the log-sum-exp runs both parts. No
sliding window here: its mask depends on each sequence's full length (callers fall
back to the plain kernel).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.paged_attention.api import paged_attention
from pallas_kernels.paged_attention.gpu import _next_pow2, merge_splits

# Query rows per kv head in one prefix program: G * chunk <= this (64 keeps the GPU
# kernel's f32 accumulator [rows, D] within registers at D = 128).
MAX_PREFIX_ROWS = 64
# Narrowest table find_shared_prefix returns (8 pages: 128 tokens at page 16), so that
# the suffix tables of a decode run take one or two widths.
MIN_TABLE_WIDTH = 8


class SharedPrefix(NamedTuple):
    """Which sequences share which leading pages.

    Attributes:
      pages: [P] int32 the shared pages in order (entries past the prefix: any valid
        page index).
      length: [] int32 tokens in the shared pages (a multiple of the page size).
      shares: [B] bool, True for the sequences whose tables start with `pages` and
        whose lengths are at least `length`.
      suffix_table: [B, S] int32 each sequence's pages after the prefix (for a
        sequence that does not share it: its whole table).

    P and S may be narrower than the full tables (find_shared_prefix trims them): the
    kernels split their work over the table's width, and a wide table of short rows
    would leave most splits empty.
    """

    pages: jax.Array
    length: jax.Array
    shares: jax.Array
    suffix_table: jax.Array


def cascade_paged_attention(q, k_pages, v_pages, lengths, prefix: SharedPrefix, *,
                            sm_scale: float | None = None, logit_soft_cap: float | None = None,
                            impl: str = "auto", chunk: int | None = None, block_sizes=None):
    """Decode attention of `paged_attention` (no sliding window), with `prefix` read
    once per `chunk` sequences.

    Args:
      q: [B, H, D]; k_pages, v_pages: [kv_heads, num_pages, page_size, D] pools.
      lengths: [B] int32 keys of each sequence, the shared prefix included.
      prefix: the SharedPrefix of the batch.
      chunk: sequences whose queries share one read of the prefix (default: as many as
        fit MAX_PREFIX_ROWS query rows per kv head).
      block_sizes: the backend's BlockSizes for both parts (None: its defaults).
    Returns:
      [B, H, D] in q's dtype: equal to paged_attention over the full tables.
    """
    b, h, d = q.shape
    hkv = k_pages.shape[0]
    g = h // hkv
    chunk = chunk or max(1, MAX_PREFIX_ROWS // g)
    kw = dict(sm_scale=sm_scale if sm_scale is not None else d**-0.5,
              logit_soft_cap=logit_soft_cap, impl=impl, block_sizes=block_sizes, return_lse=True)

    own = lengths - jnp.where(prefix.shares, prefix.length, 0)
    o_own, lse_own = paged_attention(q, k_pages, v_pages, own, prefix.suffix_table, **kw)

    # Sequences in chunks of `chunk`; per kv head, the chunk's G-head groups side by side.
    n = -(-b // chunk)
    qc = jnp.pad(q.reshape(b, hkv, g, d), ((0, n * chunk - b), (0, 0), (0, 0), (0, 0)))
    qc = qc.reshape(n, chunk, hkv, g, d).transpose(0, 2, 1, 3, 4).reshape(n, hkv * chunk * g, d)
    table = jnp.broadcast_to(prefix.pages, (n, prefix.pages.shape[0]))
    o_pre, lse_pre = paged_attention(qc, k_pages, v_pages, jnp.full((n,), prefix.length, jnp.int32),
                                     table, **kw)

    def unchunk(x):  # [n, hkv * chunk * g, ...] -> [B, H, ...]
        x = x.reshape(n, hkv, chunk, g, *x.shape[2:]).swapaxes(1, 2)
        return x.reshape(n * chunk, h, *x.shape[4:])[:b]

    o_pre, lse_pre = unchunk(o_pre), unchunk(lse_pre)
    lse_pre = jnp.where(prefix.shares[:, None], lse_pre, -jnp.inf)
    o, _ = merge_splits(jnp.stack([o_own, o_pre]).astype(jnp.float32), jnp.stack([lse_own, lse_pre]))
    return o.astype(q.dtype)


def find_shared_prefix(table, lengths, page_size: int, *, pages_held=None) -> SharedPrefix | None:
    """The longest run of leading pages that the most sequences share, from the host's
    block tables (numpy): the rows whose first page is the most common first page
    share the leading pages they all hold, up to the shortest row's full pages.

    Args:
      table: [B, max_pages] int page tables; lengths: [B] int tokens per row (0: unused).
      pages_held: [B] int pages each row holds, i.e. what the call may fill (default:
        the pages its length covers); the suffix table keeps room for all of them.
    Returns:
      A SharedPrefix (numpy arrays) whose tables are cut to a power-of-two width (at
      least MIN_TABLE_WIDTH, at most max_pages; few widths, so few compilations), or
      None when no page is shared by two rows.
    """
    import numpy as np

    table, lengths = np.asarray(table), np.asarray(lengths)
    rows = np.flatnonzero(lengths >= page_size)
    if rows.size < 2:
        return None
    firsts, counts = np.unique(table[rows, 0], return_counts=True)
    if counts.max() < 2:
        return None
    group = rows[table[rows, 0] == firsts[counts.argmax()]]
    agree = (table[group] == table[group[0]]).all(axis=0)
    num = min(int(agree.argmin()) if not agree.all() else agree.size,
              int(lengths[group].min()) // page_size)
    shares = np.zeros(table.shape[0], bool)
    shares[group] = True
    held = -(-lengths // page_size) if pages_held is None else np.asarray(pages_held)
    own = np.where(shares, held - num, held)

    def width(n):  # a power of two >= n, within [MIN_TABLE_WIDTH, max_pages]
        return min(table.shape[1], max(MIN_TABLE_WIDTH, _next_pow2(int(n))))

    pages = np.zeros(width(num), np.int32)
    pages[:num] = table[group[0], :num]
    suffix = table.astype(np.int32, copy=True)
    suffix[group] = 0
    suffix[group, :table.shape[1] - num] = table[group, num:]
    return SharedPrefix(pages, np.int32(num * page_size), shares, suffix[:, :width(own.max())])
