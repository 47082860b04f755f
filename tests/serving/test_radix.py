"""Radix prefix cache against a brute-force model: the set of cached page-aligned
prefixes (prefix-closed), the page of each, and the time each was last used."""
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from serving.paged import PagePool, PoolExhausted
from serving.radix import RadixCache

PAGE = 2


def chunks(tokens):
    return [tuple(tokens[i:i + PAGE]) for i in range(0, len(tokens) - PAGE + 1, PAGE)]


class Model:
    """cached: prefix (tuple of chunks) -> page; time: prefix -> last use."""

    def __init__(self):
        self.cached, self.time, self.clock = {}, {}, 0

    def match(self, tokens):
        c = chunks(tokens)
        k = 0
        while k < len(c) and tuple(c[:k + 1]) in self.cached:
            k += 1
        self.clock += 1
        for j in range(1, k + 1):
            self.time[tuple(c[:j])] = self.clock
        return k * PAGE, [self.cached[tuple(c[:j])] for j in range(1, k + 1)]

    def insert(self, tokens, pages):
        c = chunks(tokens)
        existed = sum(tuple(c[:j]) in self.cached for j in range(1, len(c) + 1))
        self.clock += 1
        for j in range(1, len(c) + 1):
            self.cached.setdefault(tuple(c[:j]), pages[j - 1])
            self.time[tuple(c[:j])] = self.clock
        return existed * PAGE

    def leaves(self):
        return [p for p in self.cached
                if not any(len(q) == len(p) + 1 and q[:-1] == p for q in self.cached)]


def tree_prefixes(cache):
    """Every cached prefix of the tree -> its page, from the root-to-leaf entries."""
    out = {}
    for tokens, pages in cache.entries():
        c = chunks(list(tokens))
        assert len(c) == len(pages) and len(tokens) == len(c) * PAGE
        for j in range(1, len(c) + 1):
            prefix = tuple(c[:j])
            assert out.setdefault(prefix, pages[j - 1]) == pages[j - 1]
    return out


TOKENS = st.lists(st.integers(0, 1), max_size=9)
OPS = st.one_of(
    st.tuples(st.just("insert"), TOKENS),
    st.tuples(st.just("match"), TOKENS),
    st.tuples(st.just("match_lock"), TOKENS),
    st.tuples(st.just("unlock"), st.integers(0, 5)),
    st.tuples(st.just("evict"), st.integers(0, 6)),
)


@settings(max_examples=120, deadline=None)
@given(st.lists(OPS, max_size=30))
# Inserts that must evict first (the model once missed evictions made inside insert).
@example([("insert", [0, 0, 1, 1, 0, 0, 0, 0]), ("insert", [1, 0, 0, 0]), ("insert", [0] * 8),
          ("insert", [0, 1, 0, 0, 0, 0, 0, 0]), ("insert", [0, 0, 1, 1, 0, 0, 0, 0])])
@example([("insert", [1, 0, 0, 0]), ("insert", [1, 1, 0, 0, 0, 0]), ("insert", [0] * 8),
          ("insert", [0, 1, 0, 0, 0, 0, 0, 0]), ("insert", [0] * 8)])
def test_radix_against_model(ops):
    pool = PagePool(num_pages=16, page_size=PAGE)
    cache, model = RadixCache(pool), Model()
    running = []  # (node, prefix chunks, pages held) of requests that locked a match
    queried = matched = 0

    def evict_and_check(num_pages):
        """Evict through the tree, check it against the model, and mirror it there."""
        before, free_before = dict(model.cached), pool.num_free
        freed = cache.evict(num_pages)
        after = tree_prefixes(cache)
        assert pool.num_free - free_before == freed
        # Only removals, and the remaining prefixes keep their pages.
        assert all(before[p] == page for p, page in after.items())
        evicted = set(before) - set(after)
        locked = {path[:j] for _, path, _ in running for j in range(1, len(path) + 1)}
        assert not evicted & locked, "a locked prefix was evicted"
        model.cached = {p: before[p] for p in after}
        unlocked_leaves = [p for p in model.leaves() if p not in locked]
        # Stops once enough is freed; short only when nothing evictable remains.
        assert freed >= num_pages or not unlocked_leaves
        if num_pages == 0:
            assert not evicted
        # LRU: nothing evicted was used more recently than a surviving unlocked leaf.
        for e in evicted:
            for r in unlocked_leaves:
                assert model.time[e] <= model.time[r]

    for kind, arg in ops:
        if kind == "insert":
            n = len(arg) // PAGE
            if n > pool.num_free:  # what an engine does before allocating
                evict_and_check(n - pool.num_free)
            try:
                pages = pool.allocate(n)
            except PoolExhausted:
                continue
            assert cache.insert(arg, pages) == model.insert(arg, pages)
            pool.release(pages)  # the request finished; the tree keeps what it stored
        elif kind in ("match", "match_lock"):
            m = cache.match_prefix(arg)
            assert (m.length, m.pages) == model.match(arg)
            queried, matched = queried + len(arg), matched + m.length
            if kind == "match_lock":
                cache.lock(m.node)
                pool.retain(m.pages)  # the request's block table shares the pages
                running.append((m.node, tuple(chunks(arg)[:m.length // PAGE]), m.pages))
        elif kind == "unlock" and running:
            node, _, pages = running.pop(arg % len(running))
            cache.unlock(node)
            pool.release(pages)
        elif kind == "evict":
            evict_and_check(arg)
        # Invariants after every operation.
        assert tree_prefixes(cache) == model.cached
        holders = {}
        for page in list(model.cached.values()) + [p for *_, ps in running for p in ps]:
            holders[page] = holders.get(page, 0) + 1
        for page in range(pool.num_pages):  # no page freed while the tree or a request holds it
            assert pool.refcount(page) == holders.get(page, 0)
        assert cache.num_cached_pages == len(model.cached)
    assert cache.tokens_queried == queried and cache.tokens_matched == matched


def test_split_on_partial_match_and_lock_survives_split():
    pool = PagePool(num_pages=8, page_size=2)
    cache = RadixCache(pool)
    pages = pool.allocate(3)
    cache.insert([1, 1, 2, 2, 3, 3], pages)
    pool.release(pages)
    m = cache.match_prefix([1, 1, 2, 2, 3, 3])
    cache.lock(m.node)
    # A diverging insert splits the locked edge after its first page.
    other = pool.allocate(2)
    assert cache.insert([1, 1, 9, 9], other) == 2
    pool.release(other)
    assert sorted(t for t, _ in cache.entries()) == [(1, 1, 2, 2, 3, 3), (1, 1, 9, 9)]
    assert cache.evict(10) == 1  # only the unlocked [9, 9] page can go
    assert cache.entries() == [((1, 1, 2, 2, 3, 3), pages)]
    cache.unlock(m.node)
    assert cache.evict(10) == 3 and pool.num_free == 8
    with pytest.raises(ValueError, match="not locked"):
        cache.unlock(m.node)


def test_lru_order():
    pool = PagePool(num_pages=8, page_size=1)
    cache = RadixCache(pool)
    for seq in ([1, 2], [3, 4], [5, 6]):
        pages = pool.allocate(2)
        cache.insert(seq, pages)
        pool.release(pages)
    cache.match_prefix([1, 2])  # [1, 2] is now the most recent, [3, 4] the oldest
    assert cache.evict(2) == 2
    assert sorted(t for t, _ in cache.entries()) == [(1, 2), (5, 6)]
    assert cache.evict(1) == 2  # whole leaves: [5, 6] goes entirely
    assert [t for t, _ in cache.entries()] == [(1, 2)]


def test_hit_rate_and_partial_pages():
    pool = PagePool(num_pages=4, page_size=4)
    cache = RadixCache(pool)
    pages = pool.allocate(2)
    assert cache.insert(list(range(7)), pages) == 0  # 7 tokens: only the full page cached
    assert cache.num_cached_pages == 1
    assert cache.match_prefix(list(range(7))).length == 4
    assert cache.match_prefix([9, 9, 9, 9]).length == 0
    assert cache.hit_rate == pytest.approx(4 / 11)
    with pytest.raises(ValueError, match="must cover"):
        cache.insert(list(range(8)), pages[:1])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2), max_size=20), st.lists(st.integers(0, 2), max_size=20))
def test_common_prefix_len_matches_a_plain_loop(a, b):
    from serving.radix import common_prefix_len

    want = 0
    while want < min(len(a), len(b)) and a[want] == b[want]:
        want += 1
    assert common_prefix_len(a, b) == want == common_prefix_len(tuple(a), b)
