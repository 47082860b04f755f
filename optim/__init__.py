"""Optimizers: AdamW, Muon and Moonlight (on optax.contrib), QK-Clip, schedules, factory.

    tx = optim.build_optimizer(cfg.optim, nnx.state(model, nnx.Param), total_steps=cfg.train.steps)
    print(optim.param_table(optim.label_params(nnx.state(model, nnx.Param))))
"""
from optim.factory import OPTIMIZERS, build_optimizer, build_schedule
from optim.labels import ParamSpec, group_counts, label_params, mla_fused_splits, param_table
from optim.muon import muon_chain, shape_scale, update_rms
from optim.qk_clip import qk_clip, qk_clip_factors
from optim.schedules import SCHEDULES, make_schedule

__all__ = [
    "OPTIMIZERS", "SCHEDULES", "ParamSpec", "build_optimizer", "build_schedule", "group_counts",
    "label_params", "make_schedule", "mla_fused_splits", "muon_chain", "param_table", "qk_clip", "qk_clip_factors",
    "shape_scale", "update_rms",
]
