"""build_dataset: config fields checked before any data is read; splits and loaders wired."""
import math

import numpy as np
import pytest

from configs.base import get_base_config
from data.dataset import build_dataset, check_data_config
from data.prepare import prepare


def data_cfg(**overrides):
    cfg = get_base_config().data
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def text_dir(root, n=20):
    root.mkdir()
    for i in range(n):
        (root / f"f{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * (i + 1))
    return str(root)


def test_default_config_names_the_stdlib_and_passes_checks():
    cfg = data_cfg()
    assert cfg.source == "stdlib" and cfg.tokenizer == "byte"
    check_data_config(cfg)


def test_split_by_fraction_and_loaders(tmp_path):
    src = text_dir(tmp_path / "src")
    ds = build_dataset(data_cfg(source=src, val_fraction=0.2, seq_len=32, batch_size=4))
    names = set(ds.train.names) | set(ds.val.names)
    assert len(names) == 20 and set(ds.train.names).isdisjoint(ds.val.names)
    batch = next(ds.train_loader(seed=0))
    assert {k: v.shape for k, v in batch.items()} == {k: (4, 32) for k in batch}
    assert len(list(ds.eval_batches(num_batches=1))) == 1
    assert ds.bits_per_byte(math.log(2) * 3.0) == pytest.approx(3.0)  # bytes: nats/ln2


def test_named_validation_source_and_no_validation(tmp_path):
    src = text_dir(tmp_path / "src")
    paths = prepare(src, str(tmp_path / "bin"), val_fraction=0.25)
    ds = build_dataset(data_cfg(source=paths["train"], val_source=paths["val"]))
    ref = build_dataset(data_cfg(source=src, val_fraction=0.25))
    for a, b in ((ds.train, ref.train), (ds.val, ref.val)):
        assert len(a) == len(b)
        for i in range(len(a)):
            np.testing.assert_array_equal(a[i], b[i])
    ds = build_dataset(data_cfg(source=src, val_fraction=0.0))
    assert ds.val is None and len(ds.train) == 20
    with pytest.raises(ValueError, match="no validation data"):
        ds.eval_batches()


@pytest.mark.parametrize("overrides, match", [
    (dict(seq_len=1), "data.seq_len=1"),
    (dict(batch_size=-2), "data.batch_size=-2"),
    (dict(val_fraction=1.0), "data.val_fraction=1.0"),
    (dict(tokenizer="gpt2"), "data.tokenizer='gpt2'"),
    (dict(source="no/such/dir"), "data.source='no/such/dir'"),
    (dict(source=""), "data.source=''"),
    (dict(val_source="no/such.bin"), "data.val_source='no/such.bin'"),
])
def test_bad_fields_raise_value_error_naming_them(tmp_path, overrides, match):
    cfg = data_cfg(**({"source": text_dir(tmp_path / "src", 2)} | overrides))
    with pytest.raises(ValueError, match=match.replace(".", r"\.")):
        build_dataset(cfg)


def test_field_checks_come_before_reading(tmp_path, monkeypatch):
    import data.dataset as dataset
    monkeypatch.setattr(dataset, "load_source", lambda *a, **k: pytest.fail("read data"))
    with pytest.raises(ValueError, match="data.seq_len"):
        build_dataset(data_cfg(seq_len=1))
    with pytest.raises(ValueError, match="data.tokenizer"):
        build_dataset(data_cfg(tokenizer="nope"))


def test_binary_file_in_source_is_reported(tmp_path):
    src = text_dir(tmp_path / "src", 3)
    (tmp_path / "src" / "model.safetensors").write_bytes(b"\x00\x01binary\xff")
    with pytest.raises(ValueError, match="data.source.*model.safetensors.*not text"):
        build_dataset(data_cfg(source=src))
