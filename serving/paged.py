"""Paged KV cache bookkeeping: a fixed page pool, per-sequence block tables, sharing.

PagedAttention (Kwon et al., 2023, https://arxiv.org/abs/2309.06180, vLLM) stores the
KV cache of every sequence in fixed-size pages drawn from one preallocated pool, so
memory is allocated a page at a time instead of a max-length slab per sequence, and
sequences can share pages (a common prompt, parallel samples of one prompt).

This file is the host side, in plain Python:

  * `PagePool`: `num_pages` page ids, a free list and a reference count per page.
  * `BlockTables`: for each sequence, its pages in token order and its length;
    `allocate` / `append` reserve room for new tokens (a new page when the last one is
    full), `fork` shares all pages of a sequence with a new one, `free` drops a
    sequence. Writing into a page that another sequence also holds triggers
    copy-on-write: the sequence gets a fresh page, and the returned `WritePlan` lists
    the (src, dst) page copy to perform before the write.
  * Running out of pages raises `PoolExhausted` *before* any state changes, so an
    engine can catch it, preempt or evict (serving/radix.py), and retry.

and the device side, in jnp: `write_kv` scatters new K/V at (page, offset) slots of a
WritePlan, `copy_pages` performs its copy-on-write copies. The pools are
`[kv_heads, num_pages, page_size, head_dim]`, the layout `paged_attention` reads.

    >>> import jax.numpy as jnp
    >>> tables = BlockTables(PagePool(num_pages=8, page_size=4))
    >>> plan = tables.allocate("a", 6)          # a 6-token prompt: 2 pages
    >>> k = v = jnp.zeros((2, 8, 4, 16))        # [kv_heads, num_pages, page_size, D]
    >>> k, v = copy_pages(k, v, plan.copies)
    >>> k, v = write_kv(k, v, jnp.ones((6, 2, 16)), jnp.ones((6, 2, 16)), plan.pages, plan.offsets)
    >>> tables.fork("a", "b")                  # "b" shares both pages
    >>> tables.append("b", 1).copies           # its 2nd page is half full and shared
    [(1, 2)]
    >>> tables.block_table(["a", "b"], max_pages=3).tolist()
    [[0, 1, 0], [0, 2, 0]]
"""
from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence

import jax.numpy as jnp
import numpy as np


class PoolExhausted(RuntimeError):
    """Not enough free pages; raised before any state changes."""

    def __init__(self, needed: int, available: int):
        super().__init__(f"page pool exhausted: {needed=} pages, {available=} free")
        self.needed = needed
        self.available = available


class PagePool:
    """`num_pages` pages of `page_size` token slots, with a free list and refcounts.

    A page is free when its count is 0. `allocate` hands out pages with count 1;
    `retain` adds a holder; `release` drops one and returns the page to the free list
    when the last holder goes. Releasing a free page is an error, never a silent
    double free.
    """

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1:
            raise ValueError(f"{num_pages=} must be >= 1")
        if page_size < 1:
            raise ValueError(f"{page_size=} must be >= 1")
        self.num_pages = num_pages
        self.page_size = page_size
        self._refcount = [0] * num_pages
        # A stack, lowest ids on top: the most recently freed page is reused first.
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def refcount(self, page: int) -> int:
        return self._refcount[page]

    def allocate(self, n: int) -> list[int]:
        """n fresh pages (count 1 each), or PoolExhausted with nothing taken."""
        if n < 0:
            raise ValueError(f"{n=} must be >= 0")
        if n > len(self._free):
            raise PoolExhausted(n, len(self._free))
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._refcount[p] = 1
        return pages

    def retain(self, pages: Sequence[int]) -> None:
        """One more holder for each page; the pages must be allocated."""
        for p in pages:
            self._check_live(p, "retain")
        for p in pages:
            self._refcount[p] += 1

    def release(self, pages: Sequence[int]) -> list[int]:
        """Drop one holder of each page; returns the pages that became free."""
        counts: dict[int, int] = {}
        for p in pages:
            counts[p] = counts.get(p, 0) + 1
        for p, c in counts.items():
            self._check_live(p, "release")
            if c > self._refcount[p]:
                raise ValueError(f"release of page {p} {c} times exceeds its refcount "
                                 f"{self._refcount[p]}")
        freed = []
        for p in pages:
            self._refcount[p] -= 1
            if self._refcount[p] == 0:
                self._free.append(p)
                freed.append(p)
        return freed

    def _check_live(self, page: int, op: str) -> None:
        if not 0 <= page < self.num_pages:
            raise ValueError(f"{op}: {page=} must lie in [0, {self.num_pages})")
        if self._refcount[page] == 0:
            raise ValueError(f"{op}: {page=} is free")


@dataclasses.dataclass(frozen=True)
class WritePlan:
    """Where the new tokens of one `allocate`/`append` go, and what to copy first.

    Attributes:
      pages, offsets: int32 [n] page and slot of each new token, in token order.
      copies: (src, dst) page copies (copy-on-write) to run before writing.
    """

    pages: np.ndarray
    offsets: np.ndarray
    copies: list[tuple[int, int]]


class BlockTables:
    """Per-sequence page lists and lengths over one `PagePool`."""

    def __init__(self, pool: PagePool):
        self.pool = pool
        self.page_size = pool.page_size
        self._pages: dict[Hashable, list[int]] = {}
        self._length: dict[Hashable, int] = {}

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._pages

    def length(self, seq_id) -> int:
        return self._length[self._check(seq_id)]

    def pages(self, seq_id) -> list[int]:
        return list(self._pages[self._check(seq_id)])

    def num_pages(self, seq_id) -> int:
        """Pages a sequence holds (room for its tokens so far and those reserved)."""
        return len(self._pages[self._check(seq_id)])

    def allocate(self, seq_id, num_tokens: int, *, prefix_pages: Sequence[int] = (),
                 prefix_len: int | None = None) -> WritePlan:
        """Start a sequence of `num_tokens` tokens, the first `prefix_len` of which are
        already cached in `prefix_pages` (e.g. a radix-cache hit; the pages are shared,
        not copied). Returns the plan for the remaining tokens."""
        if seq_id in self._pages:
            raise ValueError(f"sequence {seq_id!r} already exists")
        prefix_pages = list(prefix_pages)
        if prefix_len is None:
            prefix_len = len(prefix_pages) * self.page_size
        if -(-prefix_len // self.page_size) != len(prefix_pages):
            raise ValueError(f"{prefix_len=} needs {-(-prefix_len // self.page_size)} pages of "
                             f"{self.page_size}, got {len(prefix_pages)} prefix_pages")
        if num_tokens < prefix_len:
            raise ValueError(f"{num_tokens=} must be >= {prefix_len=}")
        self.pool.retain(prefix_pages)
        self._pages[seq_id] = prefix_pages
        self._length[seq_id] = prefix_len
        try:
            return self.append(seq_id, num_tokens - prefix_len)
        except PoolExhausted:
            self.free(seq_id)
            raise

    def append(self, seq_id, num_tokens: int = 1) -> WritePlan:
        """Reserve slots for `num_tokens` more tokens: new pages as needed, and a
        private copy of the last page if it is partly filled and shared."""
        self._check(seq_id)
        if num_tokens < 0:
            raise ValueError(f"{num_tokens=} must be >= 0")
        pages, length, ps = self._pages[seq_id], self._length[seq_id], self.page_size
        new_length = length + num_tokens
        grow = -(-new_length // ps) - len(pages)
        cow = num_tokens > 0 and length % ps != 0 and self.pool.refcount(pages[-1]) > 1
        needed = grow + int(cow)
        if needed > self.pool.num_free:  # check before changing anything
            raise PoolExhausted(needed, self.pool.num_free)
        copies = []
        if cow:
            (dst,) = self.pool.allocate(1)
            copies.append((pages[-1], dst))
            self.pool.release([pages[-1]])
            pages[-1] = dst
        pages.extend(self.pool.allocate(grow))
        self._length[seq_id] = new_length
        pos = np.arange(length, new_length)
        return WritePlan(pages=np.asarray([pages[t // ps] for t in pos], np.int32).reshape(-1),
                         offsets=(pos % ps).astype(np.int32), copies=copies)

    def fork(self, parent, child) -> None:
        """`child` starts as a copy of `parent`, sharing all its pages."""
        self._check(parent)
        if child in self._pages:
            raise ValueError(f"sequence {child!r} already exists")
        self.pool.retain(self._pages[parent])
        self._pages[child] = list(self._pages[parent])
        self._length[child] = self._length[parent]

    def free(self, seq_id) -> list[int]:
        """Drop a sequence; returns the pages that went back to the free list."""
        self._check(seq_id)
        del self._length[seq_id]
        return self.pool.release(self._pages.pop(seq_id))

    def block_table(self, seq_ids: Sequence, max_pages: int | None = None) -> np.ndarray:
        """int32 [len(seq_ids), max_pages] page table, padded with page 0 (masked by
        the lengths in attention)."""
        rows = [self._pages[self._check(s)] for s in seq_ids]
        need = max((len(r) for r in rows), default=0)
        max_pages = max(need, 1) if max_pages is None else max_pages
        if need > max_pages:
            raise ValueError(f"{max_pages=} is smaller than the longest block table ({need})")
        table = np.zeros((len(rows), max_pages), np.int32)
        for i, r in enumerate(rows):
            table[i, :len(r)] = r
        return table

    def lengths(self, seq_ids: Sequence) -> np.ndarray:
        return np.asarray([self._length[self._check(s)] for s in seq_ids], np.int32)

    def _check(self, seq_id):
        if seq_id not in self._pages:
            raise KeyError(f"unknown sequence {seq_id!r}")
        return seq_id


def write_kv(k_pages, v_pages, k, v, pages, offsets):
    """Scatter new keys/values into the pools.

    Args:
      k_pages, v_pages: [kv_heads, num_pages, page_size, D] pools.
      k, v: [N, kv_heads, D] new tokens.
      pages, offsets: int [N] slot of each token (a WritePlan). A page index
        >= num_pages is dropped, so fixed-shape batches can pad with it.
    Returns:
      The updated (k_pages, v_pages).
    """
    def scatter(pool, x):
        x = jnp.swapaxes(x, 0, 1).astype(pool.dtype)  # [kv_heads, N, D]
        return pool.at[:, pages, offsets].set(x, mode="drop")

    return scatter(k_pages, k), scatter(v_pages, v)


def copy_pages(k_pages, v_pages, copies: Sequence[tuple[int, int]]):
    """Perform a WritePlan's copy-on-write copies (src -> dst pages) in both pools."""
    if not copies:
        return k_pages, v_pages
    src = jnp.asarray([c[0] for c in copies], jnp.int32)
    dst = jnp.asarray([c[1] for c in copies], jnp.int32)
    return k_pages.at[:, dst].set(k_pages[:, src]), v_pages.at[:, dst].set(v_pages[:, src])
