"""Packing documents into fixed-length rows with segment ids and positions.

Documents, in some order, are concatenated into one stream, and the stream is cut
into rows of `seq_len` tokens ("concatenate and chunk"; Raffel et al. 2020, T5's
packed examples; Krell et al. 2021, "Efficient sequence packing without
cross-contamination"). No token is wasted on padding except at the very end of the
stream. Inside a row each piece of a document is a segment:

  tokens       [T] int32  the stream's tokens
  targets      [T] int32  the next token *of the same document* (0 where there is none)
  loss_mask    [T] f32    1 where a target exists; 0 at each document's last token and
                          on padding
  segment_ids  [T] int32  1, 2, ... per document piece in the row; 0 = padding
  positions    [T] int32  0, 1, ... restarting at every segment

Attention never crosses segments (DESIGN.md), so a document shorter than a row gets
exactly the loss it would get alone. A document longer than a row is cut at row
boundaries and each piece restarts at position 0 (the simplest choice, and what
T5/MaxText packers do): its second piece sees no context from the first. The target
of a piece's last token is still the document's next token (it sits in the next
row), so every token of a document except the first is predicted exactly once; the
first token of a document is never a target. No BOS/EOS is needed.

    >>> import numpy as np
    >>> from data.sources import from_arrays
    >>> from data.packing import pack_rows, stream_offsets
    >>> docs = from_arrays([np.array([1, 2, 3]), np.array([4, 5])])
    >>> order = np.arange(len(docs)); cum = stream_offsets(docs.lengths[order])
    >>> b = pack_rows(docs, order, cum, np.array([0]), seq_len=4)
    >>> b["segment_ids"]   # two documents share the row
    array([[1, 1, 1, 2]], dtype=int32)
    >>> b["positions"]
    array([[0, 1, 2, 0]], dtype=int32)
    >>> b["targets"]       # 3 ends its document: no target
    array([[2, 3, 0, 5]], dtype=int32)
    >>> b["loss_mask"]     # the target of 4 (5) sits in the next row, yet counts
    array([[1., 1., 0., 1.]], dtype=float32)
"""
from __future__ import annotations

import numpy as np

from data.sources import Documents

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def stream_offsets(lengths: np.ndarray) -> np.ndarray:
    """int64 [D+1]: where each document starts in the stream, and the stream's end."""
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])


def empty_rows(num_rows: int, seq_len: int) -> dict[str, np.ndarray]:
    """All-padding rows: every array zero, so they add nothing to a masked loss."""
    out = {k: np.zeros((num_rows, seq_len), np.int32) for k in BATCH_KEYS}
    out["loss_mask"] = np.zeros((num_rows, seq_len), np.float32)
    return out


def fill_row(out: dict[str, np.ndarray], docs: Documents, order: np.ndarray,
             cum: np.ndarray, start: int) -> None:
    """Write stream tokens [start, start + T) into the 1-D arrays of `out` (zeros first).

    Args:
      out: the five [T] arrays of one row, all zero on entry.
      docs: the documents.
      order: [D] the order in which documents are concatenated into the stream.
      cum: [D+1] `stream_offsets(docs.lengths[order])`.
      start: a stream position.
    """
    seq_len = out["tokens"].shape[0]
    end = min(start + seq_len, int(cum[-1]))
    i = int(np.searchsorted(cum, start, side="right")) - 1  # document holding `start`
    pos, col, seg = start, 0, 0
    while pos < end:
        d = int(order[i])
        first = pos - int(cum[i])                     # offset of this piece in its document
        n = min(end, int(cum[i + 1])) - pos           # tokens of the piece in this row
        doc_len = int(docs.lengths[d])
        s = int(docs.starts[d]) + first
        # One token past the piece, when the document has it: the last target.
        piece = np.asarray(docs.tokens[s:s + min(n + 1, doc_len - first)], np.int32)
        seg += 1
        out["tokens"][col:col + n] = piece[:n]
        out["targets"][col:col + piece.size - 1] = piece[1:]
        out["loss_mask"][col:col + piece.size - 1] = 1.0
        out["segment_ids"][col:col + n] = seg
        out["positions"][col:col + n] = np.arange(n)
        pos, col, i = pos + n, col + n, i + 1


def pack_rows(docs: Documents, order: np.ndarray, cum: np.ndarray,
              row_starts: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """Rows beginning at stream positions `row_starts` -> dict of [R, T] arrays.

    A start at or past the end of the stream gives an all-padding row.
    """
    out = empty_rows(len(row_starts), seq_len)
    for r, start in enumerate(row_starts):
        if start < cum[-1]:
            fill_row({k: v[r] for k, v in out.items()}, docs, order, cum, int(start))
    return out
