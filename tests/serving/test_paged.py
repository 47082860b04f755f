"""Page pool and block tables against a brute-force model of every sequence's tokens."""
import chex
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.paged_attention import gather_pages, paged_attention
from serving.paged import BlockTables, PagePool, PoolExhausted, copy_pages, write_kv

PAGE = 3
NUM_PAGES = 12


class Simulation:
    """BlockTables plus a host copy of the pool contents, checked against a model
    where each sequence is a plain list of token values."""

    def __init__(self):
        self.pool = PagePool(NUM_PAGES, PAGE)
        self.tables = BlockTables(self.pool)
        self.data = np.full((NUM_PAGES, PAGE), -1)  # what each slot holds
        self.model: dict[int, list[int]] = {}
        self.next_value = 0

    def _apply(self, plan, n):
        for src, dst in plan.copies:  # copy-on-write first, as the engine would
            self.data[dst] = self.data[src]
        values = list(range(self.next_value, self.next_value + n))
        self.next_value += n
        assert len(plan.pages) == len(plan.offsets) == n
        self.data[plan.pages, plan.offsets] = values
        return values

    def snapshot(self):
        seqs = {s: (self.tables.pages(s), self.tables.length(s)) for s in self.model}
        return seqs, [self.pool.refcount(p) for p in range(NUM_PAGES)], self.pool.num_free

    def step(self, op):
        kind, a, b, n = op
        before = self.snapshot()
        try:
            if kind == "alloc" and a not in self.model:
                prefix_pages, prefix = [], []
                if b in self.model:  # share b's full pages, like a prefix-cache hit
                    k = min(n, self.tables.length(b) // PAGE)
                    prefix_pages, prefix = self.tables.pages(b)[:k], self.model[b][:k * PAGE]
                total = len(prefix) + n
                plan = self.tables.allocate(a, total, prefix_pages=prefix_pages)
                self.model[a] = prefix + self._apply(plan, n)
            elif kind == "append" and a in self.model:
                plan = self.tables.append(a, n)
                self.model[a] += self._apply(plan, n)
            elif kind == "fork" and a in self.model and b not in self.model:
                self.tables.fork(a, b)
                self.model[b] = list(self.model[a])
            elif kind == "free" and a in self.model:
                freed = self.tables.free(a)
                del self.model[a]
                assert all(self.pool.refcount(p) == 0 for p in freed)
        except PoolExhausted as e:
            # Nothing changed, and the pool really lacked the pages.
            assert self.snapshot() == before
            assert e.available == self.pool.num_free and e.needed > e.available
        self.check()

    def check(self):
        holders = np.zeros(NUM_PAGES, int)
        for s, tokens in self.model.items():
            pages, length = self.tables.pages(s), self.tables.length(s)
            assert length == len(tokens)
            assert len(pages) == -(-length // PAGE)
            got = [self.data[pages[t // PAGE], t % PAGE] for t in range(length)]
            assert got == tokens, f"sequence {s} reads {got}, expected {tokens}"
            for p in pages:
                holders[p] += 1
        # Refcount = number of block tables holding the page; free exactly when 0.
        assert [self.pool.refcount(p) for p in range(NUM_PAGES)] == holders.tolist()
        assert self.pool.num_free == int((holders == 0).sum())
        assert sorted(self.pool._free) == [p for p in range(NUM_PAGES) if holders[p] == 0]


OPS = st.tuples(st.sampled_from(["alloc", "append", "append", "fork", "free"]),
                st.integers(0, 2), st.integers(0, 2), st.integers(0, 7))


@settings(max_examples=100, deadline=None)
@given(st.lists(OPS, max_size=25))
def test_block_tables_against_model(ops):
    sim = Simulation()
    for op in ops:
        sim.step(op)


def test_copy_on_write_keeps_parent_intact():
    sim = Simulation()
    sim.step(("alloc", 0, -1, 4))  # pages [0, 1]; page 1 half full
    sim.step(("fork", 0, 1, 0))
    assert sim.pool.refcount(1) == 2
    plan = sim.tables.append(1, 1)
    assert plan.copies == [(1, 2)] and plan.pages.tolist() == [2]
    assert sim.tables.pages(0) == [0, 1] and sim.tables.pages(1) == [0, 2]
    assert sim.pool.refcount(0) == 2 and sim.pool.refcount(1) == 1
    # A full shared page is never copied: appending to a page-aligned fork takes a new page.
    sim2 = Simulation()
    sim2.step(("alloc", 0, -1, 6))
    sim2.step(("fork", 0, 1, 0))
    assert sim2.tables.append(1, 2).copies == []


def test_pool_exhausted_is_atomic_and_catchable():
    tables = BlockTables(PagePool(num_pages=3, page_size=2))
    tables.allocate("a", 4)
    with pytest.raises(PoolExhausted) as info:
        tables.allocate("b", 4)  # needs 2, one free
    assert (info.value.needed, info.value.available) == (2, 1)
    assert "b" not in tables and tables.pool.num_free == 1
    tables.fork("a", "c")
    tables.append("c", 1)  # last page full: one new page, no copy
    with pytest.raises(PoolExhausted):
        tables.append("a", 3)
    assert tables.length("a") == 4 and tables.pages("a") == [0, 1]
    # Copy-on-write plus growth need 2 pages with 1 free: nothing may be half done.
    tables = BlockTables(PagePool(num_pages=3, page_size=2))
    tables.allocate("a", 3)
    tables.fork("a", "b")  # page 1 is half full and shared
    with pytest.raises(PoolExhausted) as info:
        tables.append("b", 2)
    assert (info.value.needed, info.value.available) == (2, 1)
    assert tables.pages("b") == [0, 1] and tables.length("b") == 3
    assert [tables.pool.refcount(p) for p in range(3)] == [2, 2, 0]


def test_pool_rejects_misuse():
    pool = PagePool(num_pages=2, page_size=4)
    with pytest.raises(ValueError, match="is free"):
        pool.release([0])
    (p,) = pool.allocate(1)
    with pytest.raises(ValueError, match="exceeds its refcount"):
        pool.release([p, p])
    with pytest.raises(ValueError, match="must lie in"):
        pool.retain([5])
    with pytest.raises(ValueError, match="num_pages"):
        PagePool(num_pages=0, page_size=4)
    tables = BlockTables(pool)
    with pytest.raises(ValueError, match="prefix_len"):
        tables.allocate("x", 8, prefix_pages=[p], prefix_len=5)
    with pytest.raises(KeyError):
        tables.append("missing")
    tables.allocate("y", 5, prefix_pages=[p])  # 4 shared tokens + 1 on a new page
    assert tables.pages("y") == [p, 1 - p]
    with pytest.raises(ValueError, match="max_pages"):
        tables.block_table(["y"], max_pages=1)


def test_write_copy_gather_roundtrip():
    """write_kv + copy_pages place each token where gather_pages reads it back."""
    rng = np.random.default_rng(0)
    tables = BlockTables(PagePool(num_pages=10, page_size=4))
    kp = jnp.zeros((2, 10, 4, 8))
    vp = jnp.zeros((2, 10, 4, 8))
    dense_k, dense_v = {}, {}

    def extend(seq, n):
        nonlocal kp, vp
        plan = tables.append(seq, n) if seq in tables else tables.allocate(seq, n)
        k = rng.standard_normal((n, 2, 8)).astype(np.float32)
        v = rng.standard_normal((n, 2, 8)).astype(np.float32)
        kp, vp = copy_pages(kp, vp, plan.copies)
        kp, vp = write_kv(kp, vp, jnp.asarray(k), jnp.asarray(v), plan.pages, plan.offsets)
        dense_k[seq] = np.concatenate([dense_k.get(seq, np.zeros((0, 2, 8))), k])
        dense_v[seq] = np.concatenate([dense_v.get(seq, np.zeros((0, 2, 8))), v])

    extend("a", 6)
    tables.fork("a", "b")
    dense_k["b"], dense_v["b"] = dense_k["a"].copy(), dense_v["a"].copy()
    extend("b", 3)  # copy-on-write of a's half-full page
    extend("a", 1)
    seqs = ["a", "b"]
    table = jnp.asarray(tables.block_table(seqs, max_pages=4))
    for pool_, dense in ((kp, dense_k), (vp, dense_v)):
        got = gather_pages(pool_, table)  # [B, 16, Hkv, D]
        for i, s in enumerate(seqs):
            n = tables.length(s)
            chex.assert_trees_all_close(np.asarray(got[i, :n]), dense[s])

    # The paged attention of those pools equals dense attention per sequence.
    q = jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.float32)
    o = paged_attention(q, kp, vp, jnp.asarray(tables.lengths(seqs)), table, impl="reference")
    for i, s in enumerate(seqs):
        k, v = dense_k[s], dense_v[s]  # [n, Hkv, D]
        for h in range(4):
            logits = k[:, h // 2] @ np.asarray(q[i, h]) / np.sqrt(8)
            w = np.exp(logits - logits.max())
            chex.assert_trees_all_close(np.asarray(o[i, h]), (w / w.sum()) @ v[:, h // 2],
                                        atol=1e-5, rtol=1e-5)


def test_write_kv_drops_padding_slots():
    kp = vp = jnp.zeros((1, 2, 2, 3))
    k = jnp.ones((2, 1, 3))
    kp2, _ = write_kv(kp, vp, k, k, jnp.array([1, 2]), jnp.array([0, 0]))  # page 2 = padding
    want = np.zeros((1, 2, 2, 3))
    want[0, 1, 0] = 1
    chex.assert_trees_all_close(kp2, want)
