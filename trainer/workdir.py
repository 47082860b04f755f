"""Whether a run may use a workdir: the saved config is the workdir's source of truth.

A workdir belongs to one run: `config.json` (written when the run starts), its
checkpoints and its `metrics.jsonl`. A later call of train.py with the same workdir
resumes that run, so it must be the same run: `check_workdir` compares the fields that
fix what a checkpoint holds and what the data stream is (below) with the saved config
and raises a ValueError naming every difference, before anything is built, computed or
written. Nothing in the workdir is renamed, moved or overwritten. Fields that only
change how the run continues (train.steps, optim.lr and the schedule, eval and log
intervals, the attention kernel, remat, compute dtype) may differ: that is how a run
is extended or sped up.

To train a changed config, use a new workdir; to start it from the weights of an old
run, add `--config.train.init_from=OLD_WORKDIR` (trainer/checkpoint.py `init_from`).

    >>> check_workdir(cfg, "runs/tiny")      # None, or ValueError naming the fields
"""
from __future__ import annotations

import json
import os

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
# Model fields that change speed or numerics, not the parameters or the function.
EXECUTION_FIELDS = ("model.attention_impl", "model.remat", "model.dtype",
                    "model.track_max_logits", "model.moe.dispatch", "model.moe.gmm_impl",
                    "model.matmul_precision")
# Outside `model`: what fixes the optimizer state's layout and the data stream.
RUN_FIELDS = ("optim.name", "seed", "data.source", "data.val_source", "data.val_fraction",
              "data.tokenizer", "data.seq_len")


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def as_plain(cfg) -> dict:
    """The config as config.json holds it (tuples become lists, as JSON has them)."""
    return json.loads(cfg.to_json_best_effort())


def read_config(workdir: str) -> dict | None:
    """The saved config of a workdir as a plain dict, or None if it has none."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is unreadable ({e}); it records the run of this workdir: "
                         "repair it or use a new --workdir") from e


def _defaults() -> dict:
    """Flat defaults of every declared field, the optional sections' (mla, moe) included."""
    import configs.base as base
    cfg = as_plain(base.get_base_config())
    for name in ("mla", "moe", "ssm"):
        make = getattr(base, f"{name}_defaults", None)
        if make is not None:
            cfg["model"][name] = as_plain(make())
    return _flatten(cfg)


def structural_differences(saved: dict, cfg, *, model_only: bool = False) -> list[str]:
    """'field: saved -> now' for every compared field that differs.

    `model_only`: only the parameters' fields (for train.init_from: a run started from
    another's weights may change its optimizer, data and dropout).
    """
    old, new = _flatten(saved), _flatten(as_plain(cfg))
    if model_only:
        skip = set(EXECUTION_FIELDS) | {"model.dropout", "model.attention_dropout"}
        keys = sorted(k for k in old.keys() | new.keys() if k.startswith("model.") and k not in skip)
    else:
        keys = sorted(k for k in old.keys() | new.keys()
                      if (k.startswith("model.") and k not in EXECUTION_FIELDS) or k in RUN_FIELDS)
    missing = object()
    defaults = _defaults()
    diffs = []
    for k in keys:
        a, b = old.get(k, missing), new.get(k, missing)
        # A field added to the code after the run started reads as its default.
        a = defaults.get(k, missing) if a is missing else a
        b = defaults.get(k, missing) if b is missing else b
        if a != b:
            shown = ["(absent)" if x is missing else repr(x) for x in (a, b)]
            diffs.append(f"{k}: {shown[0]} -> {shown[1]}")
    return diffs


def checkpoint_steps(workdir: str) -> list[int]:
    """Step numbers of the step directories under workdir/checkpoints (complete or not)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def check_workdir(cfg, workdir: str) -> None:
    """ValueError unless `cfg` may start or resume a run in `workdir` (reads, never writes)."""
    source = cfg.train.get("init_from")
    if source:
        check_init_from(cfg, source)
    if not os.path.exists(workdir):
        return
    if not os.path.isdir(workdir):
        raise ValueError(f"--workdir={workdir} is a file, not a directory")
    steps = checkpoint_steps(workdir)
    saved = read_config(workdir)
    if steps and saved is not None:
        diffs = structural_differences(saved, cfg)
        if diffs:
            shown = "; ".join(diffs[:12]) + (f"; and {len(diffs) - 12} more" if len(diffs) > 12 else "")
            raise ValueError(
                f"--workdir={workdir} holds checkpoints (steps {steps[0]}..{steps[-1]}) of a run "
                f"with another config ({CONFIG_FILE}, saved -> now): {shown}. Nothing was changed. "
                "To train this config use a new --workdir; to start it from that run's weights "
                f"use a new --workdir with --config.train.init_from={workdir}; to resume the run, "
                "drop the changed overrides.")
    metrics = os.path.join(workdir, METRICS_FILE)
    if not steps and os.path.exists(metrics) and os.path.getsize(metrics) > 0:
        raise ValueError(
            f"--workdir={workdir} holds {METRICS_FILE} of an earlier run but no checkpoint to "
            "resume, so a new run would mix its log with the old one. Use a new --workdir "
            f"(or delete {metrics} if that run is not worth keeping).")


def check_init_from(cfg, source: str) -> None:
    """ValueError unless `source` is a workdir whose model fits `cfg.model`."""
    saved = read_config(source) if os.path.isdir(source) else None
    if saved is None or not checkpoint_steps(source):
        raise ValueError(f"train.init_from={source!r} must be a train.py workdir with "
                         f"{CONFIG_FILE} and checkpoints/")
    diffs = structural_differences(saved, cfg, model_only=True)
    if diffs:
        raise ValueError(f"train.init_from={source!r} holds another model (saved -> now): "
                         + "; ".join(diffs[:12]))
