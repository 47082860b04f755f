"""Packing: rows checked against a brute-force labelling of the token stream, and a
toy causal model that must give each document the same loss packed and alone."""
import numpy as np
import pytest

from data.packing import BATCH_KEYS, pack_rows, stream_offsets
from data.sources import from_arrays

VOCAB = 50


def random_docs(rng, lengths):
    return [rng.integers(0, VOCAB, size=n) for n in lengths]


def pack_all(doc_list, seq_len, order=None):
    docs = from_arrays(doc_list)
    order = np.arange(len(docs)) if order is None else np.asarray(order)
    cum = stream_offsets(docs.lengths[order])
    num_rows = -(-int(cum[-1]) // seq_len)
    return pack_rows(docs, order, cum, np.arange(num_rows + 1) * seq_len, seq_len)


def brute_force(doc_list, seq_len):
    """Label every stream position with (document, offset), then fill rows cell by cell."""
    labels = [(d, o) for d, doc in enumerate(doc_list) for o in range(len(doc))]
    num_rows = -(-len(labels) // seq_len) + 1  # plus one row past the end: all padding
    exp = {k: np.zeros((num_rows, seq_len), np.int64) for k in BATCH_KEYS}
    for s, (d, o) in enumerate(labels):
        r, c = divmod(s, seq_len)
        doc = doc_list[d]
        exp["tokens"][r, c] = doc[o]
        if o + 1 < len(doc):
            exp["targets"][r, c] = doc[o + 1]
            exp["loss_mask"][r, c] = 1
        new_piece = c == 0 or o == 0
        exp["segment_ids"][r, c] = (exp["segment_ids"][r, c - 1] if c else 0) + new_piece
        exp["positions"][r, c] = 0 if new_piece else exp["positions"][r, c - 1] + 1
    return exp, labels


CASES = {
    "short_docs": ([3, 1, 5, 2, 7, 4], 8),
    "long_docs": ([30, 2, 17, 8, 1, 9], 8),
    "exact_rows": ([8, 8, 16], 8),
    "odd": ([13, 1, 1, 40, 6, 2, 11], 7),
    "seq_len_2": ([1, 2, 3, 4, 5], 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rows_match_brute_force(case):
    lengths, seq_len = CASES[case]
    doc_list = random_docs(np.random.default_rng(0), lengths)
    got = pack_all(doc_list, seq_len)
    exp, _ = brute_force(doc_list, seq_len)
    for k in BATCH_KEYS:
        assert got[k].shape == exp[k].shape, k
        np.testing.assert_array_equal(got[k], exp[k], err_msg=k)
    assert got["loss_mask"].dtype == np.float32
    assert all(got[k].dtype == np.int32 for k in BATCH_KEYS if k != "loss_mask")


def test_every_token_once_in_order_and_documents_reconstruct():
    rng = np.random.default_rng(1)
    doc_list = random_docs(rng, rng.integers(1, 40, size=25))
    order = rng.permutation(len(doc_list))
    seq_len = 16
    got = pack_all(doc_list, seq_len, order)
    # Walk the rows; each segment must continue the next document of `order` where the
    # previous piece stopped.
    pieces = []
    for r in range(got["tokens"].shape[0]):
        seg = got["segment_ids"][r]
        for s in range(1, seg.max() + 1):
            cols = np.flatnonzero(seg == s)
            assert np.all(np.diff(cols) == 1)                      # contiguous
            np.testing.assert_array_equal(got["positions"][r, cols], np.arange(cols.size))
            pieces.append((got["tokens"][r, cols], got["targets"][r, cols],
                           got["loss_mask"][r, cols]))
        assert np.all(got["tokens"][r, seg == 0] == 0) and np.all(got["loss_mask"][r, seg == 0] == 0)
    stream = np.concatenate([p[0] for p in pieces])
    np.testing.assert_array_equal(stream, np.concatenate([doc_list[d] for d in order]))
    # Targets and mask: the document's next token, masked only at its last token.
    flat_targets = np.concatenate([p[1] for p in pieces])
    flat_mask = np.concatenate([p[2] for p in pieces])
    exp_t = np.concatenate([np.append(doc_list[d][1:], 0) for d in order])
    exp_m = np.concatenate([np.append(np.ones(len(doc_list[d]) - 1), 0) for d in order])
    np.testing.assert_array_equal(flat_targets, exp_t)
    np.testing.assert_array_equal(flat_mask, exp_m)


# ---- a toy causal model that reads tokens, positions and segment ids like a transformer


def toy_losses(tokens, positions, segment_ids, targets, params, same_doc=None):
    """Per-token cross-entropy of h_i = sum_{j<=i, seg_j=seg_i} E[x_j] g^(p_i-p_j) + P[p_i]."""
    emb, pos_emb, out, gamma = params
    t = tokens.shape[0]
    if same_doc is None:
        same_doc = segment_ids[:, None] == segment_ids[None, :]
    causal = np.tril(np.ones((t, t), bool)) & same_doc
    decay = gamma ** np.maximum(positions[:, None] - positions[None, :], 0)
    h = (causal * decay) @ emb[tokens] + pos_emb[positions]      # [T, D]
    logits = h @ out                                             # [T, V]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return logz - logits[np.arange(t), targets]


def test_per_document_loss_is_the_same_packed_and_alone():
    rng = np.random.default_rng(2)
    seq_len = 12
    doc_list = random_docs(rng, [5, 12, 3, 1, 20, 7, 9, 2, 30, 4])
    params = (rng.normal(size=(VOCAB, 8)), rng.normal(size=(seq_len, 8)),
              rng.normal(size=(8, VOCAB)), 0.7)
    got = pack_all(doc_list, seq_len)
    _, labels = brute_force(doc_list, seq_len)

    packed = np.zeros(len(doc_list))
    for r in range(got["tokens"].shape[0]):
        loss = toy_losses(got["tokens"][r], got["positions"][r], got["segment_ids"][r],
                          got["targets"][r], params) * got["loss_mask"][r]
        for c in range(seq_len):
            if r * seq_len + c < len(labels):
                packed[labels[r * seq_len + c][0]] += loss[c]

    alone = np.zeros(len(doc_list))
    start = 0
    for d, doc in enumerate(doc_list):
        # The document alone, cut where the stream crosses a row boundary.
        cuts = [0] + [o for o in range(1, len(doc)) if (start + o) % seq_len == 0] + [len(doc)]
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            targets = np.append(doc[a + 1:b + 1], 0)[: b - a]
            mask = (np.arange(a, b) + 1 < len(doc)).astype(float)
            n = b - a
            alone[d] += (toy_losses(doc[a:b], np.arange(n), np.ones(n, int), targets,
                                    params) * mask).sum()
        start += len(doc)
    np.testing.assert_allclose(packed, alone, rtol=1e-12, atol=1e-12)
    # The segment mask matters: ignoring it mixes documents and changes the losses.
    r = 0
    mixed = toy_losses(got["tokens"][r], got["positions"][r], got["segment_ids"][r],
                       got["targets"][r], params, same_doc=np.ones((seq_len, seq_len), bool))
    own = toy_losses(got["tokens"][r], got["positions"][r], got["segment_ids"][r],
                     got["targets"][r], params)
    assert not np.allclose(mixed * got["loss_mask"][r], own * got["loss_mask"][r])
