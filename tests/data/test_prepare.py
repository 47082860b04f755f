"""Token memmaps: prepare writes .bin/.idx/.json that load back to the same documents."""
import json

import numpy as np
import pytest

from data.prepare import main, prepare
from data.sources import from_arrays, load_source, read_bin, split_documents, write_bin
from data.tokenizer import ByteTokenizer


def make_corpus(root, n=12):
    rng = np.random.default_rng(0)
    texts = {}
    for i in range(n):
        words = rng.choice(["def", "x", "=", "ü", "\n", "return", "日本"], size=rng.integers(1, 30))
        texts[f"d{i:02d}/f{i}.txt"] = " ".join(words)
        (root / f"d{i:02d}").mkdir()
        (root / f"d{i:02d}" / f"f{i}.txt").write_text(texts[f"d{i:02d}/f{i}.txt"], "utf-8")
    return texts


def test_prepare_round_trip_matches_the_text_split(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    texts = make_corpus(tmp_path / "src")
    main([f"--source={tmp_path / 'src'}", f"--out={tmp_path / 'out'}", "--val_fraction=0.3"])
    printed = capsys.readouterr().out
    assert f"--config.data.source={tmp_path / 'out' / 'train.bin'}" in printed

    tok = ByteTokenizer()
    train_txt, val_txt = split_documents(load_source(str(tmp_path / "src"), tok), 0.3)
    for split, ref in (("train", train_txt), ("val", val_txt)):
        path = str(tmp_path / "out" / f"{split}.bin")
        docs = load_source(path, tok)
        assert isinstance(docs.tokens, np.memmap) and docs.tokens.dtype == np.uint16
        assert len(docs) == len(ref) > 0
        for i in range(len(docs)):
            assert tok.decode(docs[i]) == texts[ref.names[i]]       # the original text
        offsets = np.fromfile(path[:-4] + ".idx", "<i8")
        np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(ref.lengths)]))
        meta = json.loads(open(path[:-4] + ".json").read())
        assert meta == dict(dtype="uint16", vocab_size=256, tokenizer="byte",
                            num_tokens=ref.num_tokens, num_bytes=ref.num_tokens)
        assert docs.bytes_per_token == 1.0


def test_uint32_for_large_vocabularies(tmp_path):
    doc_list = [np.array([70_000, 1, 65_536]), np.array([5])]
    write_bin(from_arrays(doc_list), str(tmp_path / "t.bin"), tokenizer_name="big",
              vocab_size=80_000)
    docs, meta = read_bin(str(tmp_path / "t.bin"))
    assert meta["dtype"] == "uint32" and docs.tokens.dtype == np.uint32
    for i, ref in enumerate(doc_list):
        np.testing.assert_array_equal(docs[i], ref)
    with pytest.raises(ValueError, match="data.source.*vocab_size=80000"):
        load_source(str(tmp_path / "t.bin"), ByteTokenizer())   # ids beyond 256


def test_bare_bin_is_one_uint16_stream_split_at_the_end(tmp_path):
    stream = (np.arange(1000) % 256).astype(np.uint16)   # nanoGPT's train.bin layout
    stream.tofile(tmp_path / "raw.bin")
    docs = load_source(str(tmp_path / "raw.bin"), ByteTokenizer())
    assert len(docs) == 1
    train, val = split_documents(docs, 0.1)
    np.testing.assert_array_equal(train[0], stream[:900])
    np.testing.assert_array_equal(val[0], stream[900:])


def test_malformed_bins_raise(tmp_path):
    tok = ByteTokenizer()
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")          # not whole uint16s
    with pytest.raises(ValueError, match="multiple"):
        load_source(str(tmp_path / "odd.bin"), tok)
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "x.bin")
    np.array([0, 4, 12], "<i8").tofile(tmp_path / "x.idx")       # ends past the tokens
    with pytest.raises(ValueError, match="data.source.*offsets"):
        load_source(str(tmp_path / "x.bin"), tok)
    with pytest.raises(ValueError, match="data.source.*no such .bin"):
        load_source(str(tmp_path / "nope.bin"), tok)
    with pytest.raises(ValueError, match="val_fraction"):
        prepare(str(tmp_path / "x.bin"), str(tmp_path / "o"), val_fraction=1.0)
