"""python train.py as a user runs it: config flags, bad overrides, SIGTERM mid-training."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
from flax import nnx
from trainer_helpers import REPO, tiny_config

import arch
import optim
from trainer.checkpoint import Checkpointer, abstract_like, train_state

TINY_FLAGS = [
    "--config.model.d_model=32", "--config.model.num_layers=2", "--config.model.num_heads=2",
    "--config.model.num_kv_heads=1", "--config.model.head_dim=16", "--config.model.mlp_dim=64",
    "--config.model.max_seq_len=64", "--config.data.seq_len=32", "--config.data.batch_size=4",
    "--config.optim.schedule=constant", "--config.optim.warmup_steps=1",
    "--config.optim.lr=0.01", "--config.train.log_every=1", "--config.train.eval_every=0",
    "--config.train.checkpoint_every=1000", "--config.train.sample_tokens=0",
]


def train_cmd(workdir, *flags):
    return [sys.executable, os.path.join(REPO, "train.py"), "--config=configs/llama3.py:tiny",
            f"--workdir={workdir}", *flags]


def env():
    e = dict(os.environ)
    e.pop("XLA_FLAGS", None)            # one CPU device, as a user has
    e["JAX_PLATFORMS"] = "cpu"
    return e


def test_unknown_config_key_fails_before_anything(tmp_path):
    workdir = tmp_path / "w"
    p = subprocess.run(train_cmd(workdir, "--config.optim.lrr=1e-3"), cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "lrr" in p.stderr
    assert not workdir.exists()


def test_bad_override_value_is_a_clear_config_error(tmp_path):
    workdir = tmp_path / "w"
    p = subprocess.run(train_cmd(workdir, "--config.data.seq_len=4096"), cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert "config error: data.seq_len=4096 must be <= model.max_seq_len=256" in p.stderr
    assert "Traceback" not in p.stderr
    assert not workdir.exists()


def test_sigterm_stops_at_a_step_boundary_with_a_restorable_checkpoint(corpus, tmp_path):
    workdir = tmp_path / "w"
    # Validation split off the source (data.val_source=None cannot be set from the command line).
    flags = TINY_FLAGS + [f"--config.data.source={corpus[0]}",
                          "--config.train.steps=100000", "--config.mesh.data=1"]
    proc = subprocess.Popen(train_cmd(workdir, *flags), cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "stopped at step" in out

    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    last_step = max(r["step"] for r in records)
    assert 2 <= last_step < 100000

    cfg = tiny_config(corpus)
    model = arch.build_model(cfg.model, nnx.Rngs(params=1))
    opt = nnx.Optimizer(model, optim.build_optimizer(cfg.optim, nnx.state(model, nnx.Param),
                                                     total_steps=100000), wrt=nnx.Param)
    state = train_state(model, opt, jax.random.key(0))
    ckpt = Checkpointer(str(workdir / "checkpoints"), keep=3)
    step, restored, loader = ckpt.restore_latest(abstract_like(state))
    ckpt.close()
    assert step == last_step                      # saved at the step it stopped at
    assert loader["row"] == last_step * 4         # batch 4: the loader's place in the stream
    assert int(restored["optimizer"]["step"][...]) == last_step
    fresh = np.asarray(state["model"]["embed"]["embedding"][...])
    assert not np.allclose(np.asarray(restored["model"]["embed"]["embedding"][...]), fresh)


def test_stop_on_signal_records_and_restores_handlers():
    from trainer.signals import StopOnSignal
    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignal() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)      # handled: the test process lives on
        time.sleep(0.01)
        assert stop.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
