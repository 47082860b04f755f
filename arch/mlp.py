"""Feed-forward layers: gated (SwiGLU, GeGLU; Shazeer 2020) and plain (GELU, ReLU, ReLU^2).

  gated: y = W_down( act(W_gate x) * (W_up x) )
  plain: y = W_down( act(W_up x) )
ReLU^2 is relu(x)^2 (So et al. 2021, Primer).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from arch.common import Linear, check_choice, dtype_of

ACTIVATIONS = {
    "swiglu": (jax.nn.silu, True),
    "geglu": (lambda x: jax.nn.gelu(x, approximate=True), True),
    "gelu": (lambda x: jax.nn.gelu(x, approximate=False), False),
    "gelu_tanh": (lambda x: jax.nn.gelu(x, approximate=True), False),
    "relu": (jax.nn.relu, False),
    "relu2": (lambda x: jnp.square(jax.nn.relu(x)), False),
    "silu": (jax.nn.silu, False),
}


def activation_fn(name: str):
    check_choice("model.activation", name, tuple(ACTIVATIONS))
    return ACTIVATIONS[name]


class MLP(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs, mlp_dim: int | None = None):
        self.act, self.gated = activation_fn(cfg.activation)
        d, f = cfg.d_model, (cfg.mlp_dim if mlp_dim is None else mlp_dim)
        kw = dict(rngs=rngs, use_bias=cfg.mlp_bias, std=cfg.init_std,
                  dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype),
                  precision=cfg.get("matmul_precision", "bf16"))
        self.up = Linear(d, f, in_axes=("embed",), out_axes=("mlp",), **kw)
        self.gate = Linear(d, f, in_axes=("embed",), out_axes=("mlp",), **kw) if self.gated else None
        self.down = Linear(f, d, in_axes=("mlp",), out_axes=("embed",), **kw)

    def __call__(self, x):  # x: [B, T, D]
        h = self.up(x)
        h = self.act(self.gate(x)) * h if self.gated else self.act(h)  # [B, T, F]
        return self.down(h)
