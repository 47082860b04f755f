"""Sources: the stdlib corpus, text files, and the stable train/validation split."""
import hashlib
import os
import sysconfig

import numpy as np
import pytest

from data.sources import (
    from_arrays,
    hash_fraction,
    load_source,
    load_text_files,
    split_documents,
    stdlib_files,
)
from data.tokenizer import ByteTokenizer


def named_docs(names):
    """One tiny document per name: the split only looks at names."""
    return from_arrays([np.array([i % 256, 7]) for i in range(len(names))], list(names))


def test_stdlib_files_are_the_interpreters_own_sources():
    files = stdlib_files()
    root = sysconfig.get_paths()["stdlib"]
    names = [n for n, _ in files]
    assert len(files) > 100
    assert names == sorted(names) and len(set(names)) == len(names)
    for name, path in files:
        assert path.endswith(".py") and os.path.isfile(path)
        assert os.path.relpath(path, root).replace(os.sep, "/") == name
        parts = name.split("/")
        assert not {"site-packages", "test", "tests", "idle_test"} & set(parts[:-1])
    assert "json/decoder.py" in names and "os.py" in names


def test_stdlib_slice_tokens_are_the_file_bytes():
    files = stdlib_files()[:12]
    docs = load_text_files(files, ByteTokenizer())
    kept = [(n, p) for n, p in files if os.path.getsize(p) > 0]  # empty files are dropped
    assert docs.names == tuple(n for n, _ in kept)
    for i, (_, path) in enumerate(kept):
        with open(path, "rb") as f:
            np.testing.assert_array_equal(docs[i], np.frombuffer(f.read(), np.uint8))


def test_hash_fraction_is_sha1_of_the_path():
    for name in ("json/decoder.py", "os.py", "a/b/ü.txt"):
        hexdigest = hashlib.sha1(name.encode()).hexdigest()
        assert hash_fraction(name) == int(hexdigest[:16], 16) / 2**64


def test_split_is_disjoint_deterministic_and_stable_when_files_are_added():
    names = [n for n, _ in stdlib_files()]
    docs = named_docs(names)
    train, val = split_documents(docs, 0.05)
    assert set(train.names).isdisjoint(val.names)
    assert set(train.names) | set(val.names) == set(names)
    assert len(train) + len(val) == len(docs)
    assert 0.02 < len(val) / len(docs) < 0.09       # about 5% of the files
    train2, val2 = split_documents(named_docs(names), 0.05)
    assert (train.names, val.names) == (train2.names, val2.names)
    # Dropping every other file keeps each remaining file on its side.
    _, val_half = split_documents(named_docs(names[::2]), 0.05)
    assert set(val_half.names) == set(val.names) & set(names[::2])
    # Tokens follow their names.
    for part in (train, val):
        for i in range(len(part)):
            j = names.index(part.names[i])
            np.testing.assert_array_equal(part[i], docs[j])


def test_split_gives_each_side_at_least_one_document():
    names = ["a.txt", "b.txt", "c.txt"]
    h = [hash_fraction(n) for n in names]
    train, val = split_documents(named_docs(names), 1e-9)
    assert val.names == (names[int(np.argmin(h))],)
    train, val = split_documents(named_docs(names), 1 - 1e-9)
    assert train.names == (names[int(np.argmax(h))],)


def test_single_document_is_split_by_tokens_at_the_end():
    doc = np.arange(100) % 256
    train, val = split_documents(from_arrays([doc], ["one.txt"]), 0.1)
    np.testing.assert_array_equal(train[0], doc[:90])   # nanoGPT: data[:int(n * 0.9)]
    np.testing.assert_array_equal(val[0], doc[90:])


def test_unnamed_documents_hold_out_the_last_ones():
    docs = from_arrays([np.full(3, i) for i in range(20)])
    train, val = split_documents(docs, 0.1)
    assert [int(val[i][0]) for i in range(len(val))] == [18, 19]
    assert [int(train[i][0]) for i in range(len(train))] == list(range(18))


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_split_fraction_out_of_range(fraction):
    with pytest.raises(ValueError, match="data.val_fraction"):
        split_documents(named_docs(["a", "b"]), fraction)


def write_tree(root, files):
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())


def test_directory_glob_and_file_sources(tmp_path):
    write_tree(tmp_path, {"b.txt": "bee", "a/x.md": "# ex ü", "a/y.txt": "why",
                          ".hidden": "no", "empty.txt": ""})
    tok = ByteTokenizer()
    docs = load_source(str(tmp_path), tok)
    assert docs.names == ("a/x.md", "a/y.txt", "b.txt")          # sorted, hidden/empty out
    assert tok.decode(docs[0]) == "# ex ü"
    docs = load_source(str(tmp_path / "**" / "*.txt"), tok)
    assert docs.names == ("a/y.txt", "b.txt")
    docs = load_source(str(tmp_path / "b.txt"), tok)
    assert docs.names == ("b.txt",) and tok.decode(docs[0]) == "bee"


def test_bad_sources_raise_naming_the_field(tmp_path):
    tok = ByteTokenizer()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="data.source.*matches no files"):
        load_source(str(tmp_path / "empty"), tok)
    with pytest.raises(ValueError, match="data.source.*matches no files"):
        load_source(str(tmp_path / "*.nothing"), tok)
    with pytest.raises(ValueError, match="data.val_source.*not an existing path"):
        load_source(str(tmp_path / "missing.txt"), tok, field="data.val_source")
    write_tree(tmp_path, {"bin/blob.dat": bytes(range(256)), "latin/l.txt": "café".encode("latin-1"),
                          "blank/e.txt": ""})
    with pytest.raises(ValueError, match="data.source.*blob.dat.*not text"):
        load_source(str(tmp_path / "bin"), tok)
    with pytest.raises(ValueError, match="data.source.*l.txt.*not UTF-8"):
        load_source(str(tmp_path / "latin"), tok)
    with pytest.raises(ValueError, match="data.source.*no text"):
        load_source(str(tmp_path / "blank"), tok)
