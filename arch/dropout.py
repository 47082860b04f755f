"""Dropout where GPT-2 and nanoGPT put it, on only while training.

Srivastava et al. 2014; placement of GPT-2 (Radford et al. 2019) and nanoGPT's model.py:
  embeddings        dropout(token embedding + position embedding)      model.dropout
  residual branches dropout(branch output) before it joins the stream  model.dropout
                    (attention output projection, MLP output)
  attention         dropout on the softmax probabilities               model.attention_dropout
                    (None: the same rate as model.dropout)

Off by default: models are built *deterministic* (every dropout is the identity), so
evaluation, sampling, serving and Hugging Face parity need nothing. The training step
(trainer/step.py) runs the model through `with_dropout(model, True)`, a view with the
same variables and dropout on. From your own loop: `model.train()` / `model.eval()`
(Flax NNX), or the view.

The masks come from the model's own `dropout` RNG stream (`nnx.Rngs(dropout=...)`):
each dropout layer forks it at construction and counts its draws in an
`nnx.RngCount` variable, part of `nnx.state(model)`. So a checkpoint holds the streams'
positions and a resumed run draws exactly the masks the uninterrupted run would have.
Attention dropout draws a 32-bit seed per call and hands it to the attention kernel,
which regenerates its mask from (seed, batch, head, query, key) in the forward and the
backward (pallas_kernels/flash_attention/dropout.py).

    drop = make_dropout(0.1, rngs)          # None when the rate is 0
    y = drop(x) if drop is not None else x
    train_model = with_dropout(model, True)  # the same parameters, dropout on
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.flash_attention import DROPOUT_IMPLS


def check_rate(field: str, rate) -> float:
    """The rate as a float; ValueError naming the field unless it lies in [0, 1)."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(f"{field}={rate!r} must be a number in [0, 1) (the probability of "
                         "dropping a unit; 0 = off)")
    return float(rate)


def residual_rate(cfg) -> float:
    return check_rate("model.dropout", cfg.get("dropout", 0.0))


def attention_rate(cfg) -> float:
    """model.attention_dropout, or model.dropout when it is None (GPT-2 / nanoGPT use one rate)."""
    rate = cfg.get("attention_dropout")
    if rate is None:
        return residual_rate(cfg)
    return check_rate("model.attention_dropout", rate)


def check_dropout_config(cfg) -> None:
    """ValueError naming the field for a bad rate, or attention dropout on an impl without it."""
    residual_rate(cfg)
    rate = attention_rate(cfg)
    if rate == 0:
        return
    impl = cfg.get("attention_impl", "auto")
    if impl not in DROPOUT_IMPLS:
        raise ValueError(
            f"model.attention_impl={impl!r} has no attention dropout, but the attention "
            f"dropout rate is {rate} (model.attention_dropout, or model.dropout when that is "
            f"None); use model.attention_impl in {DROPOUT_IMPLS} or set "
            "model.attention_dropout=0.0")


def make_dropout(rate: float, rngs: nnx.Rngs) -> nnx.Dropout | None:
    """An nnx.Dropout on the `dropout` stream, built deterministic; None when `rate` is 0."""
    if rate == 0:
        return None
    return nnx.Dropout(rate, deterministic=True, rngs=rngs)


class AttentionDropout(nnx.Module):
    """Holds attention dropout's rate, mode and RNG stream; the kernel applies the mask."""

    def __init__(self, rate: float, *, rngs: nnx.Rngs):
        self.rate = rate
        self.deterministic = True
        self.rngs = rngs["dropout"].fork()

    def set_view(self, deterministic: bool | None = None):
        """Used by `nnx.view` (and so by `with_dropout`, `model.train()`, `model.eval()`)."""
        if deterministic is not None:
            self.deterministic = deterministic

    def kernel_args(self) -> dict:
        """{} when off, else dropout_rate and a fresh uint32 dropout_seed for the kernel."""
        if self.deterministic:
            return {}
        seed = jax.random.bits(self.rngs(), (), jnp.uint32)
        return {"dropout_rate": self.rate, "dropout_seed": seed}


def make_attention_dropout(cfg, rngs: nnx.Rngs) -> AttentionDropout | None:
    rate = attention_rate(cfg)
    return AttentionDropout(rate, rngs=rngs) if rate > 0 else None


def with_dropout(model, enabled: bool):
    """A view of `model` sharing its variables, with every dropout on (True) or off."""
    return nnx.view(model, deterministic=not enabled, raise_if_not_found=False)
