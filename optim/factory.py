"""`build_optimizer(cfg.optim, params)`: the optax chain a config names.

    adamw      AdamW (Loshchilov & Hutter 2019) on every parameter.
    muon       Muon (Jordan et al. 2024) on hidden matrices, update scaled by
               sqrt(max(1, B/A)); AdamW on embeddings, head, norms, biases.
    moonlight  Muon scaled by 0.2·sqrt(max(A, B)) (Liu et al. 2025), so one lr and
               weight decay serve both groups.

All three: gradient clipping by global norm first, the lr schedule of optim/schedules.py,
decoupled weight decay on matrices only, non-Param variables frozen. The labelling is
optim/labels.py; print it with `param_table(label_params(params))`.

Config fields read (configs/base.py `optim`; the ones marked * are optional):
    name, lr, schedule, warmup_steps, decay_fraction, min_lr_ratio, b1, b2, eps,
    weight_decay, grad_clip, muon_momentum, muon_nesterov,
    muon_lr*          peak lr of the Muon group (default: lr)
    muon_ns_steps*    Newton-Schulz iterations (default 5)
    muon_per_head*    orthogonalise each attention head separately (default False)
    moonlight_rms*    Moonlight's target update RMS (default 0.2)

Example:

    from configs.base import get_base_config
    cfg = get_base_config().optim
    cfg.name = "moonlight"
    tx = build_optimizer(cfg, params, total_steps=1000)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
"""
from __future__ import annotations

import optax

from optim.labels import ADAMW, FROZEN, MUON, label_params, map_params, spec_lookup
from optim.muon import muon_chain
from optim.schedules import make_schedule

OPTIMIZERS = ("adamw", "muon", "moonlight")


def _get(cfg, name, default=None):
    return cfg.get(name, default) if hasattr(cfg, "get") else getattr(cfg, name, default)


def _check_config(cfg) -> None:
    name = _get(cfg, "name")
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name={name!r} must be one of {OPTIMIZERS}")
    for field in ("weight_decay", "eps"):
        if _get(cfg, field, 0.0) < 0:
            raise ValueError(f"optim.{field}={_get(cfg, field)!r} must be >= 0")
    for field in ("b1", "b2", "muon_momentum"):
        v = _get(cfg, field, 0.9)
        if not 0.0 <= v < 1.0:
            raise ValueError(f"optim.{field}={v!r} must be in [0, 1)")
    clip = _get(cfg, "grad_clip")
    if clip is not None and clip < 0:
        raise ValueError(f"optim.grad_clip={clip!r} must be >= 0 or None (0/None: no clipping)")
    muon_lr = _get(cfg, "muon_lr")
    if muon_lr is not None and not muon_lr > 0:
        raise ValueError(f"optim.muon_lr={muon_lr!r} must be > 0 or None (None: optim.lr)")
    ns = _get(cfg, "muon_ns_steps", 5)
    if not (isinstance(ns, int) and ns >= 1):
        raise ValueError(f"optim.muon_ns_steps={ns!r} must be an int >= 1")
    tau = _get(cfg, "qk_clip_tau")
    if tau is not None and not tau > 0:
        raise ValueError(f"optim.qk_clip_tau={tau!r} must be > 0 or None (off)")


def build_schedule(cfg, lr: float, total_steps: int | None) -> optax.Schedule:
    return make_schedule(
        _get(cfg, "schedule", "constant"), lr=lr, total_steps=total_steps,
        warmup_steps=_get(cfg, "warmup_steps", 0), decay_fraction=_get(cfg, "decay_fraction", 0.2),
        min_lr_ratio=_get(cfg, "min_lr_ratio", 0.0))


def build_optimizer(cfg, params=None, *, total_steps: int | None = None,
                    overrides=None, fused=None) -> optax.GradientTransformation:
    """The optimizer `cfg.name` as one optax GradientTransformation.

    Args:
      cfg: the `optim` ConfigDict (fields in the module docstring).
      params: the parameters to label (an nnx.State with its Variables, e.g.
        `nnx.state(model)` or an `nnx.eval_shape` of it). None: labelled from the
        tree optax sees at `init` (pass the nnx.State there, as nnx.Optimizer does).
      total_steps: training steps, needed by the cosine and wsd schedules.
      overrides: labelling overrides, see `optim.labels.label_params`.
      fused: fused weights that Muon treats as separate logical matrices, e.g.
        `optim.mla_fused_splits(cfg.model)`; see `optim.labels.label_params`.

    Raises:
      ValueError: a bad config field, named with its allowed values.
    """
    _check_config(cfg)
    per_head = bool(_get(cfg, "muon_per_head", False))
    label = lambda tree: label_params(tree, per_head=per_head, overrides=overrides, fused=fused)
    get_specs = spec_lookup(None if params is None else label(params), label)

    lr = build_schedule(cfg, _get(cfg, "lr"), total_steps)
    wd = _get(cfg, "weight_decay", 0.0)

    def decay_mask(tree):
        specs = get_specs(tree)
        return map_params(lambda p, _: specs[p].decay, tree)

    adamw = optax.adamw(lr, b1=_get(cfg, "b1", 0.9), b2=_get(cfg, "b2", 0.95),
                        eps=_get(cfg, "eps", 1e-8), weight_decay=wd, mask=decay_mask)
    name = _get(cfg, "name")
    transforms = {ADAMW: adamw, FROZEN: optax.set_to_zero()}
    if name != "adamw":
        muon_lr = build_schedule(cfg, _get(cfg, "muon_lr") or _get(cfg, "lr"), total_steps)
        muon = muon_chain(
            get_specs, learning_rate=muon_lr, scale=name,
            beta=_get(cfg, "muon_momentum", 0.95), nesterov=bool(_get(cfg, "muon_nesterov", True)),
            ns_steps=_get(cfg, "muon_ns_steps", 5), weight_decay=wd,
            rms=_get(cfg, "moonlight_rms", 0.2))
        transforms[MUON] = muon

    def group(spec):  # plain AdamW takes the Muon group too
        return ADAMW if name == "adamw" and spec.group == MUON else spec.group

    def labels(tree):
        specs = get_specs(tree)
        return map_params(lambda p, _: group(specs[p]), tree)

    tx = optax.partition(transforms, labels)
    clip = _get(cfg, "grad_clip")
    if clip:
        tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    return tx
