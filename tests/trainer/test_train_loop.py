"""train_and_evaluate end to end: exact resume, loader stream, broken checkpoints, bad input."""
import os
import shutil

import jax
import numpy as np
import pytest
from trainer_helpers import assert_kernel_curve_within_bf16_noise, tiny_config

import data
from train import train_and_evaluate
from trainer.checkpoint import CheckpointWarning
from trainer.metrics import read_metrics


class RecordingLoader:
    """Wraps a TrainLoader and records every batch the trainer draws from it."""

    def __init__(self, loader, log):
        self.loader, self.log = loader, log

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.loader)
        self.log.append(batch["tokens"].copy())
        return batch

    def get_state(self):
        return self.loader.get_state()

    def set_state(self, state):
        self.loader.set_state(state)


@pytest.fixture
def record_batches(monkeypatch):
    """Lists of the token batches drawn by each train_and_evaluate call, in order."""
    runs = []
    original = data.Dataset.train_loader

    def train_loader(self, **kw):
        runs.append([])
        return RecordingLoader(original(self, **kw), runs[-1])
    monkeypatch.setattr(data.Dataset, "train_loader", train_loader)
    return runs


def train_losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
            if r["split"] == "train"}


@pytest.fixture(scope="module")
def reference_run(corpus, tmp_path_factory):
    """6 uninterrupted steps, checkpoints at 2, 4, 6; its losses and batches."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    log = []
    original = data.Dataset.train_loader
    data.Dataset.train_loader = lambda self, **kw: RecordingLoader(original(self, **kw), log)
    try:
        result = train_and_evaluate(tiny_config(corpus), workdir, progress=False)
    finally:
        data.Dataset.train_loader = original
    return workdir, train_losses(workdir), log, result


def test_reference_run_learns_and_reports(reference_run):
    workdir, losses, batches, result = reference_run
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and len(batches) == 6
    assert losses[6] < losses[1]
    assert result["step"] == 6 and not result["stopped"]
    # Byte tokens: bits per byte is the validation loss in bits.
    assert result["val_bits_per_byte"] == pytest.approx(result["val_loss"] / np.log(2))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]
    assert os.path.exists(os.path.join(workdir, "loss.png"))


def test_resume_after_stop_gives_identical_losses_and_batches(reference_run, corpus, tmp_path,
                                                              record_batches):
    _, ref_losses, ref_batches, _ = reference_run
    cfg = tiny_config(corpus)
    first = train_and_evaluate(cfg, str(tmp_path), stop_after=3, progress=False)
    assert first["stopped"] and first["step"] == 3
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "3"]
    second = train_and_evaluate(cfg, str(tmp_path), progress=False)
    assert second["step"] == 6 and not second["stopped"]

    losses = train_losses(str(tmp_path))
    assert [losses[s] for s in range(1, 7)] == [ref_losses[s] for s in range(1, 7)]  # bit-exact
    first_run, resumed_run = record_batches
    assert len(first_run) == 3 and len(resumed_run) == 3
    for got, want in zip(first_run + resumed_run, ref_batches, strict=True):
        np.testing.assert_array_equal(got, want)
    assert second["val_loss"] == reference_run[3]["val_loss"]


def test_broken_latest_checkpoint_is_skipped_and_kept(reference_run, corpus, tmp_path):
    from test_trainer_checkpoint import truncate_arrays
    ref_dir, ref_losses, _, _ = reference_run
    workdir = str(tmp_path / "run")
    shutil.copytree(os.path.join(ref_dir, "checkpoints"), os.path.join(workdir, "checkpoints"))
    damaged = truncate_arrays(os.path.join(workdir, "checkpoints", "6"))
    sizes = {os.path.basename(f): os.path.getsize(f) for f in damaged}

    with pytest.warns(CheckpointWarning, match="step 6"):
        result = train_and_evaluate(tiny_config(corpus), workdir, progress=False)
    assert result["step"] == 6
    losses = train_losses(workdir)
    assert sorted(losses) == [5, 6]                         # resumed from step 4
    assert [losses[5], losses[6]] == [ref_losses[5], ref_losses[6]]
    corrupt = os.path.join(workdir, "checkpoints", "6.corrupt")
    kept = {os.path.basename(f): os.path.getsize(f) for f in
            (os.path.join(r, n) for r, _, ns in os.walk(corrupt) for n in ns)}
    assert sizes.items() <= kept.items()                   # untouched evidence
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6", "6.corrupt"]


def snapshot(path):
    out = {}
    for root, _, names in os.walk(path):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, path)] = f.read()
    return out


@pytest.fixture
def guarded_workdir(tmp_path, monkeypatch):
    """A workdir with content that a failing run must leave alone; building a model fails."""
    import arch
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("keep me")
    (workdir / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 1.0}\n')

    def no_model(*a, **k):
        raise AssertionError("a model was built before the config was checked")
    monkeypatch.setattr(arch, "build_model", no_model)
    before = snapshot(workdir)
    yield str(workdir)
    assert snapshot(workdir) == before


def _empty_dir(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return str(d)


def _binary_dir(tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    (d / "blob.dat").write_bytes(bytes(range(256)) * 4)
    return str(d)


@pytest.mark.parametrize("case,field", [
    ("empty_dir", "data.source"),
    ("binary_file", "not text"),
    ("seq_len", "data.seq_len"),
    ("vocab", "model.vocab_size"),
    ("optim_name", "optim.name"),
    ("lr", "optim.lr"),
    ("grad_accum", "train.grad_accum"),
    ("mesh", "mesh.tensor"),
    ("steps", "train.steps"),
    ("heads", "model.num_heads"),
    ("encoder", "kind='decoder'"),
    ("no_validation", "data.val_fraction=0"),
    ("qk_clip_qk_norm", "cannot clip a model with model.qk_norm=True"),
    ("bin_vocab", "holds token id 309, but model.vocab_size=256"),
    ("bin_vocab_no_sidecar", "holds token id 309, but model.vocab_size=256"),
    ("dropout_impl", "model.attention_impl='cudnn' has no attention dropout"),
    ("cudnn_segments", "model.attention_impl='cudnn' .*cannot take segment_ids"),
    ("xla_softcap", r"model.attention_impl='xla' .*has no \['logit_soft_cap'\]"),
])
def test_bad_input_fails_before_compute_and_leaves_workdir(case, field, corpus, tmp_path,
                                                           guarded_workdir):
    cfg = tiny_config(corpus)
    if case == "empty_dir":
        cfg.data.source = _empty_dir(tmp_path)
    elif case == "binary_file":
        cfg.data.source = _binary_dir(tmp_path)
    elif case == "seq_len":
        cfg.data.seq_len = 128                              # > model.max_seq_len = 64
    elif case == "vocab":
        cfg.model.vocab_size = 100                          # byte tokenizer has 256
    elif case == "optim_name":
        cfg.optim.name = "sgdx"
    elif case == "lr":
        cfg.optim.lr = -1.0
    elif case == "grad_accum":
        cfg.train.grad_accum = 3                            # batch 4
    elif case == "mesh":
        cfg.mesh.tensor = 3                                 # 2 heads do not split 3 ways
    elif case == "steps":
        cfg.train.steps = 0
    elif case == "heads":
        cfg.model.num_kv_heads = 3                          # 2 heads
    elif case == "encoder":
        cfg.model.update(kind="encoder", causal=False)      # would see the tokens it predicts
    elif case == "no_validation":
        cfg.data.update(val_source=None, val_fraction=0.0)
    elif case == "qk_clip_qk_norm":
        cfg.model.update(qk_norm=True, track_max_logits=True)
        cfg.optim.qk_clip_tau = 100.0
    elif case.startswith("bin_vocab"):                      # ids past the byte vocabulary
        from data.sources import write_bin
        path = str(tmp_path / "big.bin")
        write_bin(data.from_arrays([np.arange(250, 310)] * 3), path, tokenizer_name="byte",
                  vocab_size=256)                   # a sidecar that understates it
        if case == "bin_vocab_no_sidecar":
            os.remove(path[:-4] + ".json")
        cfg.data.source = path
    elif case == "dropout_impl":
        cfg.model.update(dropout=0.1, attention_impl="cudnn")
    elif case == "cudnn_segments":                          # the loader's packed batches
        cfg.model.attention_impl = "cudnn"
    elif case == "xla_softcap":
        cfg.model.update(attention_impl="xla", logit_soft_cap=30.0)
    with pytest.raises(ValueError, match=field):
        train_and_evaluate(cfg, guarded_workdir, progress=False)


def test_no_workdir_is_created_on_error(corpus, tmp_path):
    cfg = tiny_config(corpus)
    cfg.data.seq_len = 1000
    with pytest.raises(ValueError, match="max_seq_len"):
        train_and_evaluate(cfg, str(tmp_path / "new"), progress=False)
    assert not (tmp_path / "new").exists()


def test_pallas_gpu_attention_trains_like_the_reference(corpus, tmp_path, monkeypatch):
    """The GPU flash-attention kernel (Pallas interpret mode here) inside the whole train
    step: the same f32 loss curve as the plain-jnp reference attention."""
    from pallas_kernels.flash_attention import gpu

    traced = []  # the kernel's forward and backward calls, seen while tracing the step
    for name in ("_fwd_call", "_bwd_call"):
        original = getattr(gpu, name)
        monkeypatch.setattr(gpu, name, lambda *a, _f=original, _n=name, **k: (
            traced.append(_n), _f(*a, **k))[1])
    losses = {}
    for impl in ("reference", "pallas_gpu"):
        cfg = tiny_config(corpus, steps=4, checkpoint_every=0)
        cfg.model.update(attention_impl=impl, dtype="float32")
        workdir = str(tmp_path / impl)
        train_and_evaluate(cfg, workdir)
        losses[impl] = train_losses(workdir)
    assert {"_fwd_call", "_bwd_call"} <= set(traced)
    assert sorted(losses["pallas_gpu"]) == [1, 2, 3, 4]
    np.testing.assert_allclose([losses["pallas_gpu"][s] for s in range(1, 5)],
                               [losses["reference"][s] for s in range(1, 5)], rtol=1e-5)
    assert losses["reference"][4] < losses["reference"][1]  # it does train


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled Pallas GPU kernels: runs on a GPU")
def test_pallas_gpu_attention_loss_curve_on_gpu(corpus, tmp_path):
    """On a GPU, the compiled kernels train a bf16 model with the reference's loss curve
    within bf16 noise: the gap to the reference is no bigger than the gap that bf16
    itself opens (reference in bf16 vs in f32), plus a small floor."""
    losses = {}
    for impl, dtype in (("reference", "float32"), ("reference", "bfloat16"),
                        ("pallas_gpu", "bfloat16")):
        cfg = tiny_config(corpus, steps=40, checkpoint_every=0, log_every=1)
        cfg.model.update(d_model=256, num_heads=4, num_kv_heads=2, head_dim=64, mlp_dim=512,
                         max_seq_len=256, attention_impl=impl, dtype=dtype)
        cfg.data.update(seq_len=256, batch_size=8)
        cfg.optim.update(lr=3e-3)
        workdir = str(tmp_path / f"{impl}_{dtype}")
        train_and_evaluate(cfg, workdir)
        curve = train_losses(workdir)
        losses[impl, dtype] = np.array([curve[s] for s in range(1, 41)])
    assert_kernel_curve_within_bf16_noise(losses, "llama-style")


def test_dropout_run_resumes_with_the_same_masks(corpus, tmp_path):
    """The dropout RNG streams live in the checkpoint: a run stopped and resumed draws the
    masks the uninterrupted run drew (bit-exact losses), and they differ from no dropout."""
    cfg = tiny_config(corpus, steps=4)
    cfg.model.dropout = 0.3
    whole = str(tmp_path / "whole")
    train_and_evaluate(cfg, whole, progress=False)
    sliced = str(tmp_path / "sliced")
    assert train_and_evaluate(cfg, sliced, stop_after=2, progress=False)["stopped"]
    train_and_evaluate(cfg, sliced, progress=False)
    assert train_losses(sliced) == train_losses(whole)
    plain = str(tmp_path / "plain")
    train_and_evaluate(tiny_config(corpus, steps=4), plain, progress=False)
    ref, drop = train_losses(plain), train_losses(whole)
    assert all(drop[s] != ref[s] for s in range(1, 5))
