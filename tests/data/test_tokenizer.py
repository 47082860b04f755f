"""Tokenizers: byte round trip against Python's own UTF-8 codec; HF tokenizer.json."""
import sys

import numpy as np
import pytest

from data.tokenizer import ByteTokenizer, make_tokenizer

TEXTS = ["", "hello", "héllo wörld", "日本語のテキスト", "emoji 🙂🚀 + combining é",
         "tabs\tand\nnewlines\r\n", "\x00\x7f\x80-ish"]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_round_trip_and_ids_are_utf8_bytes(text):
    tok = make_tokenizer("byte")
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    np.testing.assert_array_equal(ids, list(text.encode("utf-8")))
    assert tok.decode(ids) == text
    assert tok.vocab_size == 256 and tok.bytes_per_token == 1.0


def test_byte_decode_replaces_invalid_utf8():
    raw = b"ok \xff\xfe half of \xe6\x97"  # stray bytes and a truncated 3-byte character
    assert ByteTokenizer().decode(np.frombuffer(raw, np.uint8)) == raw.decode(
        "utf-8", errors="replace")


def test_byte_decode_rejects_ids_outside_vocab():
    with pytest.raises(ValueError, match="256"):
        ByteTokenizer().decode([65, 300])


@pytest.mark.parametrize("name", ["bpe", "missing.json", "", None])
def test_unknown_tokenizer_names_the_field(name):
    with pytest.raises(ValueError, match="data.tokenizer"):
        make_tokenizer(name)


def test_hf_tokenizer_without_package_says_how_to_install(tmp_path, monkeypatch):
    path = tmp_path / "tokenizer.json"
    path.write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import fails
    with pytest.raises(ImportError, match="pip install tokenizers"):
        make_tokenizer(str(path))


def test_hf_tokenizer_json_round_trip(tmp_path):
    import tokenizers
    from tokenizers import models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    corpus = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n"] * 20
    hf.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["[UNK]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(tmp_path / "tokenizer.json"))

    for spec in (str(tmp_path / "tokenizer.json"), str(tmp_path)):  # file or its directory
        tok = make_tokenizer(spec)
        text = "def g(y):\n    return y * 2  # é\n"
        ids = tok.encode(text)
        assert ids.dtype == np.int32
        assert list(ids) == hf.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
        assert tok.vocab_size == hf.get_vocab_size(with_added_tokens=True)
        assert len(ids) < len(text.encode())  # merges learned: fewer tokens than bytes
