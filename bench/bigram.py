"""Bits per byte of a smoothed byte-bigram model: the bar a trained model must clear.

The model is p(b | a) = (count(a, b) + alpha) / (count(a) + 256 alpha), counted on the
training split of the default corpus (the Python stdlib, data/sources.py) and scored
on its validation split (add-one smoothing at alpha = 1; Chen & Goodman 1999 for
the family of smoothing methods). Only pairs inside a document count, which is
exactly what a packed training batch predicts (data/packing.py: the first byte of a
document is never a target), so the mean training loss in nats / ln 2 on byte
tokens is directly comparable to the number printed here.

    python bench/bigram.py                      # whole corpus, about a second
    python bench/bigram.py --max_train_bytes=1000000

No cap by default: the stdlib's ~12 MB of training bytes count in one `np.bincount`.
`--max_train_bytes` keeps only the first training documents (in sorted path order)
up to that many bytes, for quick checks.

    >>> from bench.bigram import bigram_bits_per_byte
    >>> bpb = bigram_bits_per_byte(max_train_bytes=200_000)
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

# Run as `python bench/bigram.py` from a checkout without `pip install -e .`: the repo
# root holds the `data` package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.sources import Documents, load_source, split_documents  # noqa: E402
from data.tokenizer import ByteTokenizer  # noqa: E402

VOCAB = 256
DEFAULT_VAL_FRACTION = 0.05  # configs/base.py: data.val_fraction


def default_split(val_fraction: float = DEFAULT_VAL_FRACTION) -> tuple[Documents, Documents]:
    """(train, validation) byte documents of the default corpus, split as training does."""
    return split_documents(load_source("stdlib", ByteTokenizer()), val_fraction)


def pair_counts(docs: Documents, max_bytes: int | None = None) -> np.ndarray:
    """int64 [256, 256]: counts[a, b] of byte b following byte a inside a document."""
    counts = np.zeros(VOCAB * VOCAB, np.int64)
    used = 0
    for i in range(len(docs)):
        if max_bytes is not None and used >= max_bytes:
            break
        x = docs[i].astype(np.int64)
        if max_bytes is not None:
            x = x[: max_bytes - used]
        used += x.size
        if x.size and x.max() >= VOCAB:
            raise ValueError(f"token id {x.max()} is not a byte: the bigram needs byte tokens")
        counts += np.bincount(x[:-1] * VOCAB + x[1:], minlength=VOCAB * VOCAB)
    return counts.reshape(VOCAB, VOCAB)


def bits_per_byte(train_counts: np.ndarray, val_counts: np.ndarray, alpha: float) -> float:
    """Mean -log2 p(b | a) over the validation pairs, add-`alpha` smoothing."""
    if alpha <= 0:
        raise ValueError(f"{alpha=} must be > 0 (unseen pairs would get probability 0)")
    logp = (np.log2(train_counts + alpha)
            - np.log2(train_counts.sum(1, keepdims=True) + alpha * VOCAB))  # [256, 256]
    return float(-(val_counts * logp).sum() / val_counts.sum())


def bigram_bits_per_byte(train: Documents | None = None, val: Documents | None = None, *,
                         alpha: float = 1.0, max_train_bytes: int | None = None) -> float:
    """Validation bits per byte of an add-`alpha` byte bigram trained on `train`.

    Args:
      train, val: byte-token documents; both None: the default corpus's split.
      alpha: additive smoothing (1.0 = Laplace / add-one).
      max_train_bytes: count only the first training bytes (None: all).
    """
    if train is None and val is None:
        train, val = default_split()
    elif train is None or val is None:
        raise ValueError("pass both train and val, or neither (the default corpus)")
    return bits_per_byte(pair_counts(train, max_train_bytes), pair_counts(val), alpha)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max_train_bytes", type=int, default=None)
    p.add_argument("--val_fraction", type=float, default=DEFAULT_VAL_FRACTION)
    args = p.parse_args(argv)
    train, val = default_split(args.val_fraction)
    tc, vc = pair_counts(train, args.max_train_bytes), pair_counts(val)
    print(f"default corpus (stdlib of Python {sys.version_info.major}."
          f"{sys.version_info.minor}): train {tc.sum():,} pairs in {len(train)} files, "
          f"validation {vc.sum():,} pairs in {len(val)} files")
    # Smaller alphas fit byte data better; the grid is scored on validation itself,
    # so its best value is an optimistic (oracle) figure, reported beside add-one.
    grid = {a: bits_per_byte(tc, vc, a) for a in (1.0, 0.3, 0.1, 0.03, 0.01)}
    best = min(grid, key=grid.get)
    print(f"bigram bits/byte, add-one (alpha=1): {grid[1.0]:.4f}")
    print(f"bigram bits/byte, best alpha on validation (alpha={best}): {grid[best]:.4f}")
    print(f"{grid[1.0]:.4f}")


if __name__ == "__main__":
    main()
