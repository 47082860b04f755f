"""Where training numbers go: a JSONL file, TensorBoard when available, a loss plot.

Every record is one line of `workdir/metrics.jsonl`, e.g.
`{"step": 100, "split": "train", "loss": 2.31, "tokens_per_s": 5.1e4, ...}`: the file is
appended to, so a resumed run continues the log of the run it resumes (steps repeated
after an interruption are superseded by their later record in `read_metrics`).
TensorBoard event files go to `workdir/tensorboard/` if `tensorboardX` is importable.
`plot_losses` draws train and validation loss against step into a PNG with matplotlib's
object API (no pyplot, so it neither needs a display nor disturbs a notebook's backend).

    >>> from trainer.metrics import MetricsWriter, read_metrics, plot_losses
    >>> w = MetricsWriter("/tmp/run")
    >>> w.write(10, "train", {"loss": 2.5})
    >>> w.close()
    >>> plot_losses(read_metrics("/tmp/run/metrics.jsonl"), "/tmp/run/loss.png")
"""
from __future__ import annotations

import json
import math
import os


def _tensorboard_writer(logdir: str):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(logdir)


def _plain(value):
    """JSON-able float/int/str from numpy or jax scalars."""
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, int):
        return value
    value = float(value)
    return value if math.isfinite(value) else str(value)  # JSON has no NaN/inf


class MetricsWriter:
    """Appends metric records to `workdir/metrics.jsonl` (and TensorBoard if installed)."""

    def __init__(self, workdir: str, *, tensorboard: bool = True):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._file = open(self.path, "a")
        self._tb = _tensorboard_writer(os.path.join(workdir, "tensorboard")) if tensorboard else None

    def write(self, step: int, split: str, metrics: dict) -> None:
        record = {"step": int(step), "split": split, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "split") and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{split}/{k}", v, int(step))

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict]:
    """Records of a metrics.jsonl; for a (step, split) logged twice, the later one."""
    latest: dict[tuple, dict] = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    latest.pop((r["step"], r["split"]), None)  # re-insert: keeps file order
                    latest[(r["step"], r["split"])] = r
    return sorted(latest.values(), key=lambda r: r["step"])


def plot_losses(records: list[dict], path: str, *, title: str | None = None) -> bool:
    """Train and validation loss against step into a PNG; False if matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    for split, style in (("train", "-"), ("eval", "o-")):
        pts = [(r["step"], r["loss"]) for r in records
               if r["split"] == split and isinstance(r.get("loss"), (int, float))]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label="validation" if split == "eval" else split)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True
