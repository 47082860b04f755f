"""Loader: epochs cover every token once; resume is exact; hosts split each batch."""
import json
import math

import numpy as np
import pytest

from data.loader import TrainLoader, eval_batches
from data.sources import from_arrays


def unique_token_docs(seed=0, num_docs=30, max_len=40):
    """Documents whose every token id is unique, so a token names its (document, offset)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len, size=num_docs)
    ids = rng.permutation(int(lengths.sum())) + 1          # 0 stays free for padding
    doc_list = np.split(ids, np.cumsum(lengths)[:-1])
    where = {int(t): (d, o) for d, doc in enumerate(doc_list) for o, t in enumerate(doc)}
    return from_arrays(doc_list), doc_list, where


def take(loader, n):
    return [next(loader) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def check_rows_cover_documents(rows, doc_list, where, expected=None):
    """Every token of every document (or of `expected`) exactly once; targets are the
    document's next token."""
    tokens = rows["tokens"][rows["segment_ids"] > 0]
    if expected is None:
        expected = [int(t) for doc in doc_list for t in doc]
    assert sorted(tokens.tolist()) == sorted(expected)
    for t, tgt, m in zip(rows["tokens"].ravel(), rows["targets"].ravel(),
                         rows["loss_mask"].ravel(), strict=True):
        if t == 0:
            continue
        d, o = where[int(t)]
        has_next = o + 1 < len(doc_list[d])
        assert m == has_next and tgt == (doc_list[d][o + 1] if has_next else 0)


def test_one_epoch_holds_every_token_once_and_epochs_reshuffle():
    """Each epoch: the shuffled stream from its `shift`-th token on, every token once."""
    docs, doc_list, where = unique_token_docs()
    loader = TrainLoader(docs, seq_len=16, batch_size=4, seed=3)
    r = loader.num_rows
    assert r == -(-docs.num_tokens // 16)
    for epoch in range(2):
        plan = loader._plan(epoch)
        stream = np.concatenate([doc_list[d] for d in plan.order])
        check_rows_cover_documents(loader.rows(np.arange(epoch * r, (epoch + 1) * r)),
                                   doc_list, where, expected=stream[plan.shift:].tolist())
    assert not np.array_equal(loader.rows(np.arange(r))["tokens"],
                              loader.rows(np.arange(r, 2 * r))["tokens"])


def test_one_long_document_is_cut_at_new_points_every_epoch():
    """nanoGPT's Shakespeare case: one document. Token t is the number t, so a row's first
    token is where its window starts; windows must start at another offset each epoch,
    and resuming mid-stream (across an epoch boundary) gives exactly the same rows."""
    seq_len, n = 32, 32 * 50 + 7
    docs = from_arrays([np.arange(1, n + 1)])
    loader = TrainLoader(docs, seq_len=seq_len, batch_size=5, seed=0)
    r = loader.num_rows
    offsets = []
    for epoch in range(6):
        rows = loader.rows(np.arange(epoch * r, (epoch + 1) * r))
        live = rows["segment_ids"][:, 0] > 0
        starts = rows["tokens"][live, 0] - 1
        offsets.append(set((starts % seq_len).tolist()))
        for row in rows["tokens"][live]:   # each row a contiguous window of the text
            body = row[row > 0]
            np.testing.assert_array_equal(body, np.arange(body[0], body[0] + body.size))
    assert all(len(o) == 1 for o in offsets)             # one cut phase per epoch ...
    assert len(set().union(*offsets)) >= 4               # ... that moves between epochs
    full = take(TrainLoader(docs, seq_len=seq_len, batch_size=5, seed=0), 25)  # 2.4 epochs
    resumed = TrainLoader(docs, seq_len=seq_len, batch_size=5, seed=0)
    state = TrainLoader(docs, seq_len=seq_len, batch_size=5, seed=0)
    take(state, 9)                                       # stop inside epoch 0
    resumed.set_state(json.loads(json.dumps(state.get_state())))
    assert_batches_equal(take(resumed, 16), full[9:])


def test_same_seed_same_stream_other_seed_other_stream():
    docs, _, _ = unique_token_docs()
    kw = dict(seq_len=16, batch_size=4)
    a = take(TrainLoader(docs, seed=1, **kw), 12)
    assert_batches_equal(a, take(TrainLoader(docs, seed=1, **kw), 12))
    b = take(TrainLoader(docs, seed=2, **kw), 12)
    assert not np.array_equal(a[0]["tokens"], b[0]["tokens"])


@pytest.mark.parametrize("k", [0, 1, 7, 23])
def test_resume_reproduces_the_stream_exactly(k):
    docs, _, _ = unique_token_docs()
    kw = dict(seq_len=16, batch_size=4, seed=5)
    ref = TrainLoader(docs, **kw)
    take(ref, k)
    state = json.loads(json.dumps(ref.get_state()))        # through a checkpoint file
    expected = take(ref, 40)                               # crosses epoch boundaries
    assert ref.num_rows * 2 < 4 * (k + 40)
    fresh = TrainLoader(docs, **kw)
    take(fresh, 3)                                         # state must not leak through
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 40), expected)


def test_resume_rejects_state_of_other_data():
    docs, _, _ = unique_token_docs()
    state = TrainLoader(docs, seq_len=16, batch_size=4, seed=5).get_state()
    for other in (TrainLoader(docs, seq_len=16, batch_size=4, seed=6),
                  TrainLoader(docs, seq_len=8, batch_size=4, seed=5),
                  TrainLoader(unique_token_docs(seed=9)[0], seq_len=16, batch_size=4, seed=5)):
        with pytest.raises(ValueError, match="other data"):
            other.set_state(state)


@pytest.mark.parametrize("process_count", [2, 4])
def test_hosts_get_disjoint_rows_that_form_the_global_batch(process_count):
    docs, _, _ = unique_token_docs()
    batch_size, steps = 8, 10
    full = take(TrainLoader(docs, seq_len=16, batch_size=batch_size, seed=0), steps)
    hosts = [take(TrainLoader(docs, seq_len=16, batch_size=batch_size, seed=0,
                              process_index=p, process_count=process_count), steps)
             for p in range(process_count)]
    for step in range(steps):
        parts = [h[step] for h in hosts]
        for k in full[step]:
            assert all(p[k].shape[0] == batch_size // process_count for p in parts)
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]),
                                          full[step][k])
        seen = [set(p["tokens"][p["tokens"] > 0].tolist()) for p in parts]
        assert sum(map(len, seen)) == len(set().union(*seen))   # no token on two hosts


def test_sharded_state_resumes_on_any_host_count():
    docs, _, _ = unique_token_docs()
    a = TrainLoader(docs, seq_len=16, batch_size=8, seed=0, process_index=1, process_count=2)
    take(a, 5)
    b = TrainLoader(docs, seq_len=16, batch_size=8, seed=0)
    take(b, 5)
    assert a.get_state() == b.get_state()


def test_eval_batches_are_fixed_and_cover_the_split():
    docs, doc_list, where = unique_token_docs(seed=4)
    kw = dict(seq_len=16, batch_size=4)
    whole = list(eval_batches(docs, **kw))
    assert len(whole) == math.ceil(math.ceil(docs.num_tokens / 16) / 4)
    assert_batches_equal(whole, list(eval_batches(docs, **kw)))
    rows = {k: np.concatenate([b[k] for b in whole]) for k in whole[0]}
    check_rows_cover_documents(rows, doc_list, where)
    assert_batches_equal(list(eval_batches(docs, num_batches=2, **kw)), whole[:2])
    assert len(list(eval_batches(docs, num_batches=10**6, **kw))) == len(whole)
    halves = [list(eval_batches(docs, process_index=p, process_count=2, **kw)) for p in (0, 1)]
    for b, h0, h1 in zip(whole, *halves, strict=True):
        for k in b:
            np.testing.assert_array_equal(np.concatenate([h0[k], h1[k]]), b[k])


@pytest.mark.parametrize("kw, match", [
    (dict(seq_len=1), "data.seq_len"),
    (dict(seq_len=16.0), "data.seq_len"),
    (dict(batch_size=0), "data.batch_size"),
    (dict(batch_size=6, process_count=4), "divisible by process_count=4"),
    (dict(process_index=2, process_count=2), "process_index=2"),
])
def test_bad_batching_raises_before_any_work(kw, match):
    docs, _, _ = unique_token_docs()
    args = dict(seq_len=16, batch_size=4) | kw
    with pytest.raises(ValueError, match=match):
        TrainLoader(docs, **args)
    with pytest.raises(ValueError, match=match):
        eval_batches(docs, **args)                         # at the call, not at first next()
