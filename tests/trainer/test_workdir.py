"""A workdir belongs to one run: a changed config is refused before compute and nothing
in the workdir moves; init_from starts a new run from an old run's weights; a
non-finite loss stops without saving over the last good checkpoint."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from test_train_loop import snapshot
from trainer_helpers import tiny_config

import train
from train import NonFiniteLoss, train_and_evaluate
from trainer.checkpoint import restore_model
from trainer.metrics import read_metrics


@pytest.fixture(scope="module")
def finished_run(corpus, tmp_path_factory):
    """4 steps, checkpoints at 2 and 4."""
    workdir = str(tmp_path_factory.mktemp("run"))
    train_and_evaluate(tiny_config(corpus, steps=4), workdir, progress=False)
    return workdir


def _copy(src, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("override,field", [
    (dict(model=dict(num_layers=3)), "model.num_layers: 2 -> 3"),
    (dict(model=dict(dropout=0.1)), "model.dropout: 0.0 -> 0.1"),
    (dict(optim=dict(name="muon")), "optim.name: 'adamw' -> 'muon'"),
    (dict(data=dict(seq_len=16)), "data.seq_len: 32 -> 16"),
])
def test_changed_config_is_refused_and_the_workdir_is_untouched(finished_run, corpus, tmp_path,
                                                                 monkeypatch, override, field):
    workdir = _copy(finished_run, tmp_path)
    before = snapshot(workdir)
    cfg = tiny_config(corpus, steps=6)
    for section, values in override.items():
        cfg[section].update(values)
    import arch
    monkeypatch.setattr(arch, "build_model", lambda *a, **k: pytest.fail("model built"))
    with pytest.raises(ValueError, match=field) as e:
        train_and_evaluate(cfg, workdir, progress=False)
    assert "new --workdir" in str(e.value) and "init_from" in str(e.value)
    assert snapshot(workdir) == before


def test_changed_run_schedule_resumes(finished_run, corpus, tmp_path):
    """More steps and another lr are how a run is extended: allowed."""
    workdir = _copy(finished_run, tmp_path)
    result = train_and_evaluate(tiny_config(corpus, steps=6), workdir, progress=False)
    assert result["step"] == 6
    steps = [r["step"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
             if r["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_checkpoint_of_another_model_without_config_json_is_refused(finished_run, corpus, tmp_path):
    workdir = _copy(finished_run, tmp_path)
    os.remove(os.path.join(workdir, "config.json"))
    before = snapshot(workdir)
    cfg = tiny_config(corpus, steps=6)
    cfg.model.mlp_dim = 96
    with pytest.raises(ValueError, match="holds other arrays.*mlp"):
        train_and_evaluate(cfg, workdir, progress=False)
    assert snapshot(workdir) == before


def test_fresh_run_does_not_mix_with_an_old_metrics_log(corpus, tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text('{"step": 3, "split": "train", "loss": 1.0}\n')
    with pytest.raises(ValueError, match="metrics.jsonl of an earlier run"):
        train_and_evaluate(tiny_config(corpus), str(workdir), progress=False)
    assert os.listdir(workdir) == ["metrics.jsonl"]


def test_init_from_starts_a_new_run_from_old_weights(finished_run, corpus, tmp_path):
    cfg = tiny_config(corpus, steps=2, init_from=finished_run)
    cfg.optim.name = "muon"                                   # the optimizer may change
    workdir = str(tmp_path / "finetune")
    before = snapshot(finished_run)
    seen = {}
    original = train.init_from

    def spy(model, cfg_, source):
        step = original(model, cfg_, source)
        seen["embed"] = np.asarray(jax.device_get(model.embed.embedding[...]))
        return step
    train.init_from, restore = spy, train.init_from
    try:
        result = train_and_evaluate(cfg, workdir, progress=False)
    finally:
        train.init_from = restore
    assert result["step"] == 2
    old, _ = restore_model(tiny_config(corpus, steps=4), finished_run)
    np.testing.assert_array_equal(seen["embed"], np.asarray(old.embed.embedding[...]))
    assert snapshot(finished_run) == before
    bad = tiny_config(corpus, steps=2, init_from=finished_run)
    bad.model.num_layers = 3
    with pytest.raises(ValueError, match="train.init_from=.*model.num_layers: 2 -> 3"):
        train_and_evaluate(bad, str(tmp_path / "bad"), progress=False)


def test_non_finite_loss_stops_without_saving(corpus, tmp_path, monkeypatch):
    real_bind = train.bind_train_step
    calls = []

    def poisoned_bind(model, optimizer):
        real_step = real_bind(model, optimizer)

        def poisoned(batch, *, opts):
            out = real_step(batch, opts=opts)
            calls.append(1)
            if len(calls) >= 3:
                out = {**out, "loss": out["loss"] * float("nan")}
            return out
        return poisoned
    monkeypatch.setattr(train, "bind_train_step", poisoned_bind)
    workdir = str(tmp_path / "w")
    with pytest.raises(NonFiniteLoss, match="at step 3.*last good checkpoint: step 2"):
        train_and_evaluate(tiny_config(corpus, steps=6, log_every=4), workdir, progress=False)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]


def test_a_field_added_since_the_run_started_reads_as_its_default(corpus, tmp_path):
    # An old config.json lacks fields the code has since gained (here: model.matmul_precision
    # and the MoE impl); at their defaults they are no difference, at another value they are.
    from trainer.workdir import structural_differences
    cfg = tiny_config(corpus)
    saved = json.loads(cfg.to_json_best_effort())
    del saved["model"]["matmul_precision"]
    assert structural_differences(saved, cfg) == []
    cfg.model.qk_norm = not cfg.model.qk_norm
    del saved["model"]["qk_norm"]
    assert structural_differences(saved, cfg) == [f"model.qk_norm: {not cfg.model.qk_norm!r} -> "
                                                  f"{cfg.model.qk_norm!r}"]
