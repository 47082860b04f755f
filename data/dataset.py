"""From `cfg.data` to a tokenizer, a train/validation split and their loaders.

Every field is checked before any file is read, and every bad value raises a
ValueError that names it (`data.seq_len=1 must be an int >= 2 ...`).

    >>> from configs.base import get_base_config
    >>> from data.dataset import build_dataset
    >>> cfg = get_base_config()
    >>> ds = build_dataset(cfg.data)              # the stdlib corpus, byte tokens
    >>> loader = ds.train_loader(seed=cfg.seed)
    >>> batch = next(loader)                      # tokens/targets/... [8, 128]
    >>> for b in ds.eval_batches(num_batches=2):  # the same rows every time
    ...     pass
    >>> ds.bits_per_byte(2.0)  # nats per token -> bits per byte  # doctest: +ELLIPSIS
    2.885...
"""
from __future__ import annotations

import dataclasses
import math

from data.loader import TrainLoader, check_batching, eval_batches
from data.sources import Documents, check_source, load_source, split_documents
from data.tokenizer import make_tokenizer


@dataclasses.dataclass
class Dataset:
    """A tokenizer with its training and validation documents and batch shape."""

    tokenizer: object
    train: Documents
    val: Documents | None
    seq_len: int
    batch_size: int

    @property
    def bytes_per_token(self) -> float | None:
        """Text bytes per token (1.0 for bytes; measured for other tokenizers)."""
        docs = self.val if self.val is not None else self.train
        return docs.bytes_per_token

    def bits_per_byte(self, loss: float) -> float | None:
        """Mean loss in nats per predicted token -> bits per byte of text (None if unknown)."""
        bpt = self.bytes_per_token
        return None if bpt is None else loss / math.log(2) / bpt

    def train_loader(self, *, seed: int = 0, process_index: int = 0,
                     process_count: int = 1) -> TrainLoader:
        return TrainLoader(self.train, seq_len=self.seq_len, batch_size=self.batch_size,
                           seed=seed, process_index=process_index,
                           process_count=process_count)

    def eval_batches(self, num_batches: int | None = None, *, process_index: int = 0,
                     process_count: int = 1):
        if self.val is None:
            raise ValueError("no validation data: set data.val_source or "
                             "data.val_fraction > 0")
        return eval_batches(self.val, seq_len=self.seq_len, batch_size=self.batch_size,
                            num_batches=num_batches, process_index=process_index,
                            process_count=process_count)


def check_data_config(cfg) -> None:
    """Every `cfg.data` field, without reading any data."""
    check_batching(seq_len=cfg.seq_len, batch_size=cfg.batch_size)
    vf = cfg.get("val_fraction", 0.0)
    if not isinstance(vf, (int, float)) or not 0.0 <= vf < 1.0:
        raise ValueError(f"data.val_fraction={vf!r} must be a number in [0, 1)")
    check_source(cfg.source, field="data.source")
    if cfg.get("val_source") is not None:
        check_source(cfg.val_source, field="data.val_source")


def build_dataset(cfg) -> Dataset:
    """`cfg.data` (source, val_source, val_fraction, tokenizer, seq_len, batch_size) -> Dataset.

    Validation data: `val_source` when set; else the split of `source` by
    `val_fraction` (data/sources.py: split_documents); none when that is 0.
    """
    check_data_config(cfg)
    tokenizer = make_tokenizer(cfg.tokenizer, field="data.tokenizer")
    train = load_source(cfg.source, tokenizer, field="data.source")
    if cfg.get("val_source") is not None:
        val = load_source(cfg.val_source, tokenizer, field="data.val_source")
    elif cfg.get("val_fraction", 0.0) > 0:
        train, val = split_documents(train, cfg.val_fraction, field="data.val_fraction")
    else:
        val = None
    return Dataset(tokenizer, train, val, int(cfg.seq_len), int(cfg.batch_size))
