"""The pieces of train.py, importable on their own (notebooks, tests, benchmarks).

    step.py        loss (cross-entropy + z-loss + MoE aux), train step with gradient
                   accumulation, eval step
    checkpoint.py  orbax checkpoints: async, keep-N, skip broken ones, restore onto any mesh
    mfu.py         training FLOPs per token and device peaks
    metrics.py     metrics.jsonl, TensorBoard if installed, loss plot
    mesh.py        mesh and rules from cfg.mesh (sharding/), batches onto the mesh
    sample.py      text by recomputing the full forward pass
    config.py      every check of a training config, before any compute
    signals.py     stop at a step boundary on SIGTERM / SIGINT

    from trainer import StepOptions, train_step, eval_step, Checkpointer
"""
from trainer.checkpoint import Checkpointer, CheckpointWarning, abstract_like
from trainer.config import ConfigError, check_config
from trainer.mesh import device_batch, setup
from trainer.metrics import MetricsWriter, plot_losses, read_metrics
from trainer.mfu import flops_per_token, mfu, peak_flops
from trainer.sample import generate
from trainer.signals import StopOnSignal
from trainer.step import StepOptions, eval_step, token_loss_sums, train_step

__all__ = [
    "Checkpointer", "CheckpointWarning", "ConfigError", "MetricsWriter", "StepOptions",
    "StopOnSignal", "abstract_like", "check_config", "eval_step", "flops_per_token",
    "device_batch", "generate", "mfu", "peak_flops", "plot_losses", "read_metrics",
    "setup", "token_loss_sums", "train_step",
]
