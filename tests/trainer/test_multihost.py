"""Two processes, one run (trainer/distributed.py, scripts/launch_local.sh): the same
losses as one process on the same global batch, a SIGTERM on one host stops both at the
same step with one consistent checkpoint, and one process resumes it exactly."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from trainer_helpers import tiny_config

from train import train_and_evaluate
from trainer.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MESH = {"data": 2, "fsdp": 2}   # 4 devices: 2 processes x 2, or 4 of this process's 8


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
            if r["split"] == "train"}


def _config(corpus, steps):
    cfg = tiny_config(corpus, steps=steps, log_every=1, checkpoint_every=2, stop_check_every=1)
    cfg.mesh.update(MESH)
    return cfg


def test_two_processes_train_stop_together_and_resume_in_one(corpus, tmp_path):
    ref = str(tmp_path / "one_process")
    train_and_evaluate(_config(corpus, 6), ref, progress=False)
    want = _losses(ref)

    work = str(tmp_path / "two_processes")
    env = {**os.environ, "LAUNCH_PROGRAM": os.path.join(ROOT, "tests", "fixtures", "multihost_worker.py"),
           "PYTHON": sys.executable, "PORT": str(20000 + os.getpid() % 20000)}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [os.path.join(ROOT, "scripts", "launch_local.sh"), "2", f"--train_dir={corpus[0]}",
         f"--val_file={corpus[1]}", f"--workdir={work}", "--steps=6", f"--mesh={json.dumps(MESH)}",
         "--sigterm_process=1", "--sigterm_step=3"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["process"] for r in reports) == [0, 1]
    assert all(r["processes"] == 2 and r["devices"] == 4 for r in reports)
    # Only process 1 got the signal; both stopped after step 3, with its checkpoint.
    assert [(r["result"]["step"], r["result"]["stopped"]) for r in reports] == [(3, True)] * 2
    assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["2", "3"]
    got = _losses(work)
    assert sorted(got) == [1, 2, 3]

    # One process (4 of its 8 devices) resumes the two processes' checkpoint.
    result = train_and_evaluate(_config(corpus, 6), work, progress=False)
    assert result["step"] == 6 and not result["stopped"]
    got = _losses(work)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)],
                               rtol=1e-6, atol=1e-6)


def test_partial_multiprocess_settings_are_refused(monkeypatch):
    from trainer import distributed
    for name in ("JAX_COORDINATOR_ADDRESS", distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is False           # nothing given: one process
    with pytest.raises(ValueError, match=r"missing \['process_id'\]"):
        distributed.initialize("localhost:1", 2)
    with pytest.raises(ValueError, match=r"process_id=2 must lie in \[0, num_processes=2\)"):
        distributed.initialize("localhost:1", 2, 2)
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' must be an int"):
        distributed.initialize()
