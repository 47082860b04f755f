"""Tokenizers: bytes of UTF-8 (always available) and Hugging Face `tokenizer.json` files.

The byte tokenizer maps text to its UTF-8 bytes, so the vocabulary is 256 and a
model's loss per token, divided by ln 2, *is* its bits per byte (the measure
nanoGPT/char-level work and the bigram baseline in bench/bigram.py report).

No special tokens. Documents are kept apart by `segment_ids` when packed (see
data/packing.py), so there is no BOS/EOS to add: the first token of a document is
never a target and the last token has no target (its loss is masked). A Hugging Face
tokenizer is used with `add_special_tokens=False` for the same reason.

    >>> from data.tokenizer import make_tokenizer
    >>> tok = make_tokenizer("byte")
    >>> ids = tok.encode("héllo")          # int32 [6]: 'é' is two bytes
    >>> tok.decode(ids)
    'héllo'

`make_tokenizer("path/to/tokenizer.json")` (or a directory holding one) needs the
`tokenizers` package (`pip install tokenizers`); it only reads local files.
"""
from __future__ import annotations

import os

import numpy as np

TOKENIZER_CHOICES = "'byte' or a path to a Hugging Face tokenizer.json (or its directory)"


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, exactly one byte per token."""

    name = "byte"
    vocab_size = 256
    # Bytes of text per token, to turn a loss per token into bits per byte.
    bytes_per_token = 1.0

    def encode(self, text: str) -> np.ndarray:
        """`text` -> int32 [len(text.encode('utf-8'))]."""
        return self.encode_bytes(text.encode("utf-8"))

    def encode_bytes(self, raw: bytes) -> np.ndarray:
        """Already-UTF-8 bytes -> int32 ids, without a decode/encode round trip."""
        return np.frombuffer(raw, dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        """ids -> text; byte sequences that are not valid UTF-8 become U+FFFD."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"byte ids must lie in [0, {self.vocab_size}), got "
                             f"min={ids.min()} max={ids.max()}")
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer read from a local `tokenizer.json`.

    `bytes_per_token` depends on the text, so it is None here; data/dataset.py
    measures it on the data it tokenizes.
    """

    bytes_per_token = None

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer  # lazy: an optional dependency
        except ImportError as e:
            raise ImportError(
                f"tokenizer={path!r} needs the `tokenizers` package: pip install tokenizers"
            ) from e
        self.name = path
        self._tok = Tokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                                skip_special_tokens=False)


def make_tokenizer(name_or_path: str, *, field: str = "data.tokenizer"):
    """'byte' -> ByteTokenizer; a tokenizer.json file or a directory with one -> HFTokenizer.

    Raises:
      ValueError naming `field` when `name_or_path` is neither.
    """
    if name_or_path == "byte":
        return ByteTokenizer()
    path = str(name_or_path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not (path.endswith(".json") and os.path.isfile(path)):
        raise ValueError(f"{field}={name_or_path!r} must be {TOKENIZER_CHOICES}")
    return HFTokenizer(path)
