"""Training and evaluation batches: deterministic, resumable, sharded over hosts.

Each epoch the documents are shuffled, concatenated and cut into rows of `seq_len`
(data/packing.py); then the rows themselves are shuffled, so the rows of a batch come
from all over the corpus rather than from one long file. The cut points move every
epoch: rows start at `shift + r * seq_len` with `shift` drawn from [0, seq_len), so a
long document (one text file: nanoGPT's Shakespeare) is not shown in the same windows
every epoch, which a small model soon memorises; nanoGPT draws random windows for the
same reason. The `shift` tokens before the first cut wait for another epoch. The
permutations and the shift are drawn from `np.random.default_rng([seed, epoch])`. Epochs follow each other without end:
global row g of the training stream is row `g % R` of epoch `g // R` (R rows per
epoch; the last row of an epoch is padded). Batch k is global rows [k*B, (k+1)*B);
host p of P takes the p-th contiguous block of B/P of them, so the hosts' rows are
disjoint and together form the global batch.

The whole position in the stream is one integer, the next global row, so
`get_state()` is a tiny JSON-able dict and `set_state()` resumes with exactly the
batches that would have come next, for any number of hosts.

Why not grain: `grain` (pip install grain) gives checkpointable iterators and worker
processes, but a dependency and its packers (which pad to first-fit rather than
concatenate and chunk) are more than this needs. Random access to rows makes exact
resume and host sharding a few lines of numpy; building a batch costs microseconds
per row, far below a training step. A loader with prefetch workers is the next step
if input ever shows up in profiles.

    >>> from data.loader import TrainLoader, eval_batches
    >>> from data.sources import load_source, split_documents
    >>> from data.tokenizer import ByteTokenizer
    >>> train, val = split_documents(load_source("stdlib", ByteTokenizer()), 0.05)
    >>> loader = TrainLoader(train, seq_len=128, batch_size=8, seed=0)
    >>> batch = next(loader)                 # dict of [8, 128] arrays
    >>> state = loader.get_state()           # {'row': 8, ...}: save with the checkpoint
    >>> loader.set_state(state)              # ... and later resume from it
    >>> evals = list(eval_batches(val, seq_len=128, batch_size=8, num_batches=4))
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from data.packing import pack_rows, stream_offsets
from data.sources import Documents

# Eval rows are shuffled with a fixed seed, so the first few eval batches are a
# sample of the whole validation split, the same in every run.
EVAL_SEED = 0


def check_batching(*, seq_len, batch_size, process_index=0, process_count=1,
                   prefix: str = "data.") -> None:
    """ValueError naming the field unless the batch shape and the host slice are valid."""
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
        raise ValueError(f"{prefix}seq_len={seq_len!r} must be an int >= 2 (a row needs "
                         "a token and its target)")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"{prefix}batch_size={batch_size!r} must be an int >= 1")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"{process_index=} must lie in [0, {process_count=})")
    if batch_size % process_count:
        raise ValueError(f"{prefix}batch_size={batch_size} must be divisible by "
                         f"{process_count=} (each host takes batch_size/process_count rows)")


class EpochPlan:
    """One epoch's document order, row order and first cut (`shift`).

    `shift_cuts=False` (evaluation) cuts at 0, so the rows cover the whole stream.
    With a shift, the last row may run past the stream's end (its tail is padding).
    """

    def __init__(self, docs: Documents, seq_len: int, seed: int, epoch: int,
                 shuffle: bool = True, shift_cuts: bool = False):
        d = len(docs)
        self.num_rows = math.ceil(docs.num_tokens / seq_len)
        self.shift = 0
        if shuffle:
            rng = np.random.default_rng([seed, epoch])
            self.order = rng.permutation(d)              # [D] documents into the stream
            self.row_order = rng.permutation(self.num_rows)  # [R] stream rows into the epoch
            if shift_cuts:
                self.shift = int(rng.integers(seq_len))
        else:
            self.order, self.row_order = np.arange(d), np.arange(self.num_rows)
        self.cum = stream_offsets(docs.lengths[self.order])  # [D+1]

    def row_starts(self, rows: np.ndarray, seq_len: int) -> np.ndarray:
        """Stream positions where the epoch's rows `rows` begin."""
        return self.shift + self.row_order[rows] * seq_len


class TrainLoader:
    """Infinite iterator of packed training batches for one host.

    Args:
      docs: the training documents.
      seq_len: T, tokens per row.
      batch_size: B, rows per *global* batch; this host yields B/process_count.
      seed: shuffling seed.
      process_index, process_count: this host and the number of hosts.

    Yields:
      dict(tokens, targets, loss_mask, segment_ids, positions) of [B/P, T] arrays
      (int32; loss_mask float32).
    """

    def __init__(self, docs: Documents, *, seq_len: int, batch_size: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1):
        check_batching(seq_len=seq_len, batch_size=batch_size,
                       process_index=process_index, process_count=process_count)
        if len(docs) == 0:
            raise ValueError("docs is empty: no training documents")
        self.docs, self.seq_len, self.batch_size = docs, seq_len, batch_size
        self.seed = int(seed)
        self.process_index, self.process_count = process_index, process_count
        self.num_rows = math.ceil(docs.num_tokens / seq_len)   # rows per epoch
        self._row = 0                 # next global row of the infinite stream
        self._plans: dict[int, EpochPlan] = {}

    def _plan(self, epoch: int) -> EpochPlan:
        if epoch not in self._plans:
            # A batch spans at most two epochs: keep this one and the one before.
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
            self._plans[epoch] = EpochPlan(self.docs, self.seq_len, self.seed, epoch,
                                           shift_cuts=True)
        return self._plans[epoch]

    def rows(self, global_rows: np.ndarray) -> dict[str, np.ndarray]:
        """The packed rows at these global stream indices -> dict of [len, T] arrays."""
        out = None
        for epoch in np.unique(global_rows // self.num_rows):
            plan = self._plan(int(epoch))
            sel = global_rows // self.num_rows == epoch
            starts = plan.row_starts(global_rows[sel] % self.num_rows, self.seq_len)
            part = pack_rows(self.docs, plan.order, plan.cum, starts, self.seq_len)
            if out is None:
                out = {k: np.zeros((len(global_rows),) + v.shape[1:], v.dtype)
                       for k, v in part.items()}
            for k in out:
                out[k][sel] = part[k]
        return out

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        per_host = self.batch_size // self.process_count
        first = self._row + self.process_index * per_host
        batch = self.rows(np.arange(first, first + per_host, dtype=np.int64))
        self._row += self.batch_size
        return batch

    @property
    def epoch(self) -> float:
        """Epochs consumed so far (fractional)."""
        return self._row / self.num_rows

    def get_state(self) -> dict:
        """A JSON-able dict: the next row, and what must match to resume."""
        return dict(row=int(self._row), seed=self.seed, seq_len=int(self.seq_len),
                    num_docs=len(self.docs), num_tokens=int(self.docs.num_tokens))

    def set_state(self, state: dict) -> None:
        """Resume from `get_state()`; ValueError if it came from other data or settings."""
        mine = self.get_state()
        for key in ("seed", "seq_len", "num_docs", "num_tokens"):
            if int(state[key]) != mine[key]:
                raise ValueError(f"loader state has {key}={state[key]} but this loader "
                                 f"has {key}={mine[key]}: it belongs to other data")
        self._row = int(state["row"])


def eval_batches(docs: Documents, *, seq_len: int, batch_size: int,
                 num_batches: int | None = None, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Batches over one pass of `docs`, the same every call.

    Rows are those of one epoch with seed `EVAL_SEED`. `num_batches=None` covers the
    whole split (the last batch filled with all-padding rows); an int gives that many
    batches, or fewer if the split runs out first. Sharded like TrainLoader.
    """
    check_batching(seq_len=seq_len, batch_size=batch_size, process_index=process_index,
                   process_count=process_count)
    plan = EpochPlan(docs, seq_len, EVAL_SEED, 0)
    total = math.ceil(plan.num_rows / batch_size)
    if num_batches is not None:
        if num_batches < 1:
            raise ValueError(f"{num_batches=} must be >= 1 (or None for the whole split)")
        total = min(total, num_batches)
    per_host = batch_size // process_count

    def batches():  # a generator apart, so that the checks above run at the call
        for k in range(total):
            g = k * batch_size + process_index * per_host + np.arange(per_host)
            # Rows past the end map to a start past the stream: all padding.
            starts = np.where(g < plan.num_rows,
                              plan.row_order[np.minimum(g, plan.num_rows - 1)] * seq_len,
                              plan.cum[-1])
            yield pack_rows(docs, plan.order, plan.cum, starts, seq_len)

    return batches()
