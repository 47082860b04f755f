"""Learning-rate schedules as optax schedules: constant, warmup + cosine, warmup-stable-decay.

  constant  linear warmup from 0 to lr, then lr.
  cosine    linear warmup, then cosine decay to min_lr_ratio * lr at total_steps
            (Loshchilov & Hutter 2017; the nanoGPT / Llama recipe).
  wsd       linear warmup, constant lr, then linear decay to min_lr_ratio * lr over the
            last decay_fraction of the steps (Hu et al. 2024, MiniCPM; Hägele et al.
            2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training
            Durations"). The stable phase can be cut anywhere and decayed later.

Example:

    sched = make_schedule("wsd", lr=1e-3, total_steps=1000, warmup_steps=100)
    sched(500)   # 1e-3
"""
from __future__ import annotations

import optax

SCHEDULES = ("constant", "cosine", "wsd")


def make_schedule(name: str, *, lr: float, total_steps: int | None = None,
                  warmup_steps: int = 0, decay_fraction: float = 0.2,
                  min_lr_ratio: float = 0.0) -> optax.Schedule:
    """The schedule `name`, with peak `lr`.

    Raises:
      ValueError: unknown name, lr <= 0, negative warmup, missing or too short
        total_steps, decay_fraction outside (0, 1], min_lr_ratio outside [0, 1].
    """
    if name not in SCHEDULES:
        raise ValueError(f"optim.schedule={name!r} must be one of {SCHEDULES}")
    if not lr > 0:
        raise ValueError(f"optim.lr={lr!r} must be > 0")
    if warmup_steps < 0:
        raise ValueError(f"optim.warmup_steps={warmup_steps!r} must be >= 0")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"optim.min_lr_ratio={min_lr_ratio!r} must be in [0, 1]")
    warmup = optax.linear_schedule(0.0, lr, max(warmup_steps, 1))
    if name == "constant":
        return optax.join_schedules([warmup, optax.constant_schedule(lr)], [warmup_steps])
    if total_steps is None or total_steps <= warmup_steps:
        raise ValueError(f"total_steps={total_steps!r} must be given and > "
                         f"optim.warmup_steps={warmup_steps} for schedule={name!r}")
    end = lr * min_lr_ratio
    if name == "cosine":
        return optax.join_schedules(
            [warmup, optax.cosine_decay_schedule(lr, total_steps - warmup_steps, alpha=min_lr_ratio)],
            [warmup_steps])
    if not 0.0 < decay_fraction <= 1.0:
        raise ValueError(f"optim.decay_fraction={decay_fraction!r} must be in (0, 1]")
    decay_steps = max(1, round(decay_fraction * total_steps))
    stable_end = max(warmup_steps, total_steps - decay_steps)
    return optax.join_schedules(
        [warmup, optax.constant_schedule(lr),
         optax.linear_schedule(lr, end, total_steps - stable_end)],
        [warmup_steps, stable_end])
