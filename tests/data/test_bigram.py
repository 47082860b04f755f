"""bench/bigram.py against a brute-force bigram written with dictionaries and math.log2."""
import collections
import math

import numpy as np
import pytest

from bench.bigram import bigram_bits_per_byte, default_split
from data.sources import from_arrays


def brute_force_bpb(train_docs, val_docs, alpha):
    pairs = collections.Counter((a, b) for d in train_docs for a, b in zip(d[:-1], d[1:], strict=True))
    firsts = collections.Counter(a for d in train_docs for a in d[:-1])
    bits, n = 0.0, 0
    for d in val_docs:
        for a, b in zip(d[:-1], d[1:], strict=True):
            bits -= math.log2((pairs[(a, b)] + alpha) / (firsts[a] + 256 * alpha))
            n += 1
    return bits / n


@pytest.mark.parametrize("alpha", [1.0, 0.05])
def test_matches_brute_force_and_ignores_pairs_across_documents(alpha):
    rng = np.random.default_rng(0)
    train = [list(rng.integers(97, 105, size=n)) for n in (50, 1, 80, 30)]
    val = [list(rng.integers(97, 107, size=n)) for n in (40, 2, 25)]
    got = bigram_bits_per_byte(from_arrays(train), from_arrays(val), alpha=alpha)
    assert got == pytest.approx(brute_force_bpb(train, val, alpha), rel=1e-12)


def test_max_train_bytes_keeps_the_first_bytes():
    train = [list(b"abcabcabc"), list(b"zzzzzzzz")]
    val = [list(b"abcz")]
    got = bigram_bits_per_byte(from_arrays(train), from_arrays(val), max_train_bytes=12)
    assert got == pytest.approx(brute_force_bpb([train[0], train[1][:3]], val, 1.0))


def test_bad_arguments():
    docs = from_arrays([list(b"abc")])
    with pytest.raises(ValueError, match="alpha"):
        bigram_bits_per_byte(docs, docs, alpha=0.0)
    with pytest.raises(ValueError, match="byte"):
        bigram_bits_per_byte(from_arrays([[300, 1]]), docs)


def test_default_corpus_bigram_beats_unigram():
    train, val = default_split()
    bpb = bigram_bits_per_byte(train, val, max_train_bytes=500_000)
    # A unigram (byte frequencies, add-one) on the same bytes: the bigram must do better.
    counts = np.ones(256)
    used = 0
    for i in range(len(train)):
        x = train[i][: 500_000 - used]
        counts += np.bincount(x, minlength=256)
        used += x.size
        if used >= 500_000:
            break
    targets = np.concatenate([val[i][1:] for i in range(len(val))])
    unigram = -np.mean(np.log2(counts[targets] / counts.sum()))
    assert bpb < unigram < 8.0
