"""Where documents come from: the embedded stdlib corpus, text files, token memmaps.

A source is named by one string (`cfg.data.source`, `cfg.data.val_source`):

  "stdlib"            the `.py` files of the running interpreter's standard library
                      (`sysconfig.get_paths()["stdlib"]`; site-packages and test
                      directories skipped), so training needs no download.
  "notes.txt"         one text file = one document.
  "corpus/"           every non-hidden file under the directory, recursively; one
                      document each. Every file must be UTF-8 text.
  "corpus/**/*.md"    a glob (recursive `**` allowed); one document per file.
  "tokens.bin"        pre-tokenised tokens, memory-mapped (see below).

All sources become `Documents`: views (start, length) into one flat token array, so
a 10 GB memmap and a list of small files look the same to the packer.

Token memmap format (written by `python -m data.prepare`):
  `X.bin`   the tokens of all documents concatenated, uint16 (vocab <= 65536) or uint32.
  `X.idx`   int64 little-endian document offsets into X.bin: [0, end_0, end_1, ..., N].
            Document boundaries live here rather than as a separator token, so any
            vocabulary works without reserving an id. Without X.idx the whole file is
            one token stream (one document), like nanoGPT's train.bin.
  `X.json`  {"dtype", "vocab_size", "tokenizer", "num_tokens", "num_bytes"}. Without
            it the dtype is uint16 (nanoGPT's convention).

Validation split (`split_documents`): documents with a file name go to validation when a
stable hash of their relative path falls below `val_fraction` (sha1 -> [0, 1)), so the
split is the same on every machine and does not move when files are added. Memmap
documents have no names: the last `val_fraction` of them is held out. A single
document is split by tokens at `1 - val_fraction`, as nanoGPT splits its one stream.
The stdlib differs between Python versions, so its corpus does too.

    >>> from data.sources import load_source, split_documents
    >>> from data.tokenizer import ByteTokenizer
    >>> docs = load_source("stdlib", ByteTokenizer())
    >>> train, val = split_documents(docs, 0.05)
    >>> len(train) + len(val) == len(docs)
    True
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sysconfig

import numpy as np

SOURCE_CHOICES = ("'stdlib', a text file, a directory, a glob pattern or a .bin token "
                  "memmap")
# Directory names skipped in the stdlib corpus: installed packages and test suites
# (the latter hold deliberately odd encodings and large data files).
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test",
                              "tests", "idle_test"})
_GLOB_CHARS = "*?["


@dataclasses.dataclass(frozen=True)
class Documents:
    """Documents as (start, length) views into one flat token array.

    Attributes:
      tokens: [N] all tokens (np.ndarray or np.memmap, any unsigned/int dtype).
      starts: int64 [D] start of each document in `tokens`.
      lengths: int64 [D] tokens in each document (all > 0).
      names: D names (relative paths) or None when documents are unnamed.
      bytes_per_token: text bytes per token over the source (1.0 for bytes; None
        when unknown), to report bits per byte.
    """

    tokens: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    names: tuple[str, ...] | None = None
    bytes_per_token: float | None = None

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> np.ndarray:
        s = int(self.starts[i])
        return np.asarray(self.tokens[s:s + int(self.lengths[i])], dtype=np.int32)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def max_token(self) -> int:
        """The largest token id in `tokens` (read in chunks: a memmap stays on disk)."""
        chunk = 1 << 24
        return max((int(np.max(self.tokens[i:i + chunk])) for i in range(0, len(self.tokens), chunk)),
                   default=-1)

    def subset(self, index) -> Documents:
        """The documents at `index` (an int array or a boolean mask), in that order."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        names = None if self.names is None else tuple(self.names[i] for i in index)
        return dataclasses.replace(self, starts=self.starts[index],
                                   lengths=self.lengths[index], names=names)


def from_arrays(docs, names=None, *, bytes_per_token=None) -> Documents:
    """Documents from a list of 1-D token arrays (empty ones dropped)."""
    docs = [np.asarray(d).reshape(-1) for d in docs]
    keep = [i for i, d in enumerate(docs) if d.size]
    lengths = np.array([docs[i].size for i in keep], np.int64)
    starts = np.cumsum(lengths) - lengths
    vmax = max((int(docs[i].max()) for i in keep), default=0)
    dtype = np.uint16 if vmax < 2**16 else np.uint32
    tokens = (np.concatenate([docs[i] for i in keep]).astype(dtype) if keep
              else np.zeros(0, dtype))
    names = None if names is None else tuple(names[i] for i in keep)
    return Documents(tokens, starts, lengths, names, bytes_per_token)


# ---------------------------------------------------------------- finding files


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(*, include_tests: bool = False) -> list[tuple[str, str]]:
    """(relative path with '/', absolute path) of the stdlib's .py files, sorted by name."""
    root = stdlib_root()
    skip = STDLIB_SKIP_DIRS if not include_tests else {"site-packages", "dist-packages",
                                                       "__pycache__"}
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for f in filenames:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                out.append((os.path.relpath(path, root).replace(os.sep, "/"), path))
    return sorted(out)


def _glob_base(pattern: str) -> str:
    """The directory part of `pattern` before its first wildcard (names are relative to it)."""
    cut = min((pattern.index(c) for c in _GLOB_CHARS if c in pattern), default=len(pattern))
    return os.path.dirname(pattern[:cut]) or "."


def text_files(spec: str, *, field: str = "data.source") -> list[tuple[str, str]]:
    """(name, path) of the text files a non-.bin source names, sorted by name.

    Raises:
      ValueError naming `field` if nothing matches.
    """
    if spec == "stdlib":
        files = stdlib_files()
    elif any(c in spec for c in _GLOB_CHARS):
        base = _glob_base(spec)
        files = [(os.path.relpath(p, base).replace(os.sep, "/"), p)
                 for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
    elif os.path.isdir(spec):
        files = []
        for dirpath, dirnames, filenames in os.walk(spec):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for f in filenames:
                if not f.startswith("."):
                    p = os.path.join(dirpath, f)
                    files.append((os.path.relpath(p, spec).replace(os.sep, "/"), p))
    elif os.path.isfile(spec):
        files = [(os.path.basename(spec), spec)]
    else:
        raise ValueError(f"{field}={spec!r} is not an existing path; it must be "
                         f"{SOURCE_CHOICES}")
    if not files:
        raise ValueError(f"{field}={spec!r} matches no files; it must be {SOURCE_CHOICES}")
    return sorted(files)


def check_source(spec, *, field: str = "data.source") -> None:
    """Fail early (before reading any data) if `spec` names nothing loadable."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"{field}={spec!r} must be {SOURCE_CHOICES}")
    if spec.endswith(".bin"):
        if not os.path.isfile(spec):
            raise ValueError(f"{field}={spec!r}: no such .bin file")
    else:
        text_files(spec, field=field)


# ---------------------------------------------------------------- reading


def read_text(path: str, *, field: str = "data.source") -> str:
    """The UTF-8 text of `path`; ValueError if it is binary or not UTF-8."""
    with open(path, "rb") as f:
        raw = f.read()
    if b"\x00" in raw:
        raise ValueError(f"{field}: {path!r} is not text (it holds NUL bytes); "
                         "text sources must be UTF-8 files")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{field}: {path!r} is not UTF-8 text ({e.reason} at byte "
                         f"{e.start})") from None


def load_text_files(files, tokenizer, *, field: str = "data.source",
                    skip_bad: bool = False) -> Documents:
    """Tokenise (name, path) files, one document each.

    Args:
      skip_bad: drop files that are not UTF-8 text instead of raising (the stdlib
        corpus uses this: it is not user input, and a broken file there must not stop
        training).
    """
    docs, names, num_bytes = [], [], 0
    for name, path in files:
        try:
            text = read_text(path, field=field)
        except ValueError:
            if skip_bad:
                continue
            raise
        docs.append(tokenizer.encode(text))
        names.append(name)
        num_bytes += len(text.encode("utf-8"))
    num_tokens = sum(d.size for d in docs)
    bpt = tokenizer.bytes_per_token
    if bpt is None and num_tokens:
        bpt = num_bytes / num_tokens
    return from_arrays(docs, names, bytes_per_token=bpt)


def _sidecar(path: str, ext: str) -> str:
    return path[: -len(".bin")] + ext


def read_bin(path: str, *, field: str = "data.source") -> tuple[Documents, dict]:
    """Memory-map a token `.bin` with its `.idx` offsets and `.json` metadata."""
    meta = {}
    if os.path.isfile(_sidecar(path, ".json")):
        with open(_sidecar(path, ".json")) as f:
            meta = json.load(f)
    dtype = np.dtype(meta.get("dtype", "uint16"))
    if dtype not in (np.uint16, np.uint32):
        raise ValueError(f"{field}: {path!r} metadata dtype={dtype.name!r} must be "
                         "'uint16' or 'uint32'")
    size = os.path.getsize(path)
    if size % dtype.itemsize:
        raise ValueError(f"{field}: {path!r} has {size} bytes, not a multiple of "
                         f"{dtype.name}'s {dtype.itemsize}")
    n = size // dtype.itemsize
    tokens = np.memmap(path, dtype=dtype, mode="r") if n else np.zeros(0, dtype)
    if os.path.isfile(_sidecar(path, ".idx")):
        offsets = np.fromfile(_sidecar(path, ".idx"), dtype="<i8")
    else:
        offsets = np.array([0, n], np.int64)  # one token stream
    if (len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != n
            or np.any(np.diff(offsets) < 0)):
        raise ValueError(f"{field}: {_sidecar(path, '.idx')!r} must hold increasing "
                         f"offsets from 0 to the {n} tokens of {path!r}")
    lengths = np.diff(offsets)
    keep = lengths > 0
    bpt = None
    if meta.get("num_bytes") and meta.get("num_tokens"):
        bpt = meta["num_bytes"] / meta["num_tokens"]
    elif meta.get("tokenizer") == "byte":
        bpt = 1.0
    docs = Documents(tokens, offsets[:-1][keep].astype(np.int64),
                     lengths[keep].astype(np.int64), None, bpt)
    if len(docs) == 0:
        raise ValueError(f"{field}={path!r} holds no tokens")
    return docs, meta


def write_bin(docs: Documents, path: str, *, tokenizer_name: str, vocab_size: int) -> None:
    """Write `docs` as `path` (.bin) + .idx + .json, the format `read_bin` maps."""
    if not path.endswith(".bin"):
        raise ValueError(f"{path=} must end in .bin")
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    offsets = np.concatenate([[0], np.cumsum(docs.lengths)]).astype("<i8")
    with open(path, "wb") as f:
        for i in range(len(docs)):  # one document at a time: sources may be memmaps
            f.write(docs[i].astype(dtype).tobytes())
    offsets.tofile(_sidecar(path, ".idx"))
    bpt = docs.bytes_per_token
    meta = dict(dtype=np.dtype(dtype).name, vocab_size=int(vocab_size),
                tokenizer=tokenizer_name, num_tokens=int(offsets[-1]),
                num_bytes=None if bpt is None else int(round(bpt * int(offsets[-1]))))
    with open(_sidecar(path, ".json"), "w") as f:
        json.dump(meta, f, indent=1)


def load_source(spec: str, tokenizer, *, field: str = "data.source") -> Documents:
    """Documents of one source string (see the module docstring).

    Raises:
      ValueError naming `field`: nothing matches, a file is not UTF-8 text, a .bin is
        malformed or its vocabulary is larger than the tokenizer's.
    """
    check_source(spec, field=field)
    if spec.endswith(".bin"):
        docs, meta = read_bin(spec, field=field)
        vocab = meta.get("vocab_size")
        if vocab is not None and vocab > tokenizer.vocab_size:
            raise ValueError(f"{field}={spec!r} was written with vocab_size={vocab} > "
                             f"the tokenizer's vocab_size={tokenizer.vocab_size}")
        return docs
    docs = load_text_files(text_files(spec, field=field), tokenizer, field=field,
                           skip_bad=spec == "stdlib")
    if len(docs) == 0:
        raise ValueError(f"{field}={spec!r} holds no text (all files are empty)")
    return docs


# ---------------------------------------------------------------- splitting


def hash_fraction(name: str) -> float:
    """A stable number in [0, 1) from `name` (sha1), the same on every machine."""
    return int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big") / 2**64


def split_documents(docs: Documents, val_fraction: float, *,
                    field: str = "data.val_fraction") -> tuple[Documents, Documents]:
    """(train, validation) split of `docs`; see the module docstring for the rule.

    Both sides get at least one document (a named corpus whose hashes all fall on one
    side moves the document with the smallest / largest hash across).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"{field}={val_fraction!r} must lie in (0, 1) to split a source")
    d = len(docs)
    if d == 1:  # one stream: hold out its end
        n = int(docs.lengths[0])
        cut = int(n * (1.0 - val_fraction))
        if cut < 2 or n - cut < 2:
            raise ValueError(f"{field}={val_fraction} leaves fewer than 2 tokens on one "
                             f"side of a single {n}-token document")
        start = docs.starts[:1]
        train = dataclasses.replace(docs, lengths=np.array([cut], np.int64))
        val = dataclasses.replace(docs, starts=start + cut,
                                  lengths=np.array([n - cut], np.int64))
        return train, val
    if docs.names is not None:
        h = np.array([hash_fraction(n) for n in docs.names])
        is_val = h < val_fraction
        if not is_val.any():
            is_val[np.argmin(h)] = True
        if is_val.all():
            is_val[np.argmax(h)] = False
    else:  # unnamed (memmap) documents: the last ones, as nanoGPT holds out the end
        n_val = min(max(1, int(round(d * val_fraction))), d - 1)
        is_val = np.arange(d) >= d - n_val
    return docs.subset(~is_val), docs.subset(is_val)
