"""metrics.jsonl: appended across runs, later records of a step win; the plot is a PNG."""
import json

import numpy as np

from trainer.metrics import MetricsWriter, plot_losses, read_metrics


def test_resumed_runs_append_and_supersede(tmp_path):
    w = MetricsWriter(str(tmp_path), tensorboard=False)
    for step, loss in ((1, 5.0), (2, 4.0), (3, 3.5)):       # a run interrupted after step 3
        w.write(step, "train", {"loss": np.float32(loss)})
    w.close()
    w = MetricsWriter(str(tmp_path), tensorboard=False)     # resumed from a step-2 checkpoint
    w.write(3, "train", {"loss": 3.25, "mfu": None})
    w.write(3, "eval", {"loss": float("nan")})
    w.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(x) for x in lines)
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    train = {r["step"]: r["loss"] for r in records if r["split"] == "train"}
    assert train == {1: 5.0, 2: 4.0, 3: 3.25}
    assert [r["loss"] for r in records if r["split"] == "eval"] == ["nan"]  # JSON has no NaN


def test_loss_plot_is_a_png(tmp_path):
    records = [{"step": s, "split": "train", "loss": 5.0 / s} for s in range(1, 6)]
    records.append({"step": 5, "split": "eval", "loss": 1.2})
    path = tmp_path / "loss.png"
    assert plot_losses(records, str(path), title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
