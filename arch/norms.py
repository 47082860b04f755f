"""RMSNorm and LayerNorm, computed in f32; and the names of norm placements.

RMSNorm (Zhang & Sennrich 2019): y = x / sqrt(mean(x^2) + eps) * w. Gemma stores w
around 0 and scales by (1 + w) (`unit_offset=True`).
LayerNorm (Ba et al. 2016): y = (x - mean) / sqrt(var + eps) * w (+ b).

Placements (arch/block.py applies them):
  pre      x + f(norm(x))                          Llama, Mistral, Qwen, DeepSeek
  post     norm(x + f(x))                          original Transformer, BERT
  sandwich x + norm_post(f(norm_pre(x)))           Gemma 2/3
  olmo2    x + norm(f(x))                          OLMo 2 (no input norm)
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from arch.common import check_choice, ones_param, zeros_param

NORMS = ("rmsnorm", "layernorm")
PLACEMENTS = ("pre", "post", "sandwich", "olmo2")


def rms_norm_reference(x, w, eps, unit_offset=False):
    x32 = x.astype(jnp.float32)
    y = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps))
    scale = (1.0 + w) if unit_offset else w
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def layer_norm_reference(x, w, b, eps):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jnp.reciprocal(jnp.sqrt(var + eps)) * w.astype(jnp.float32)
    if b is not None:
        y = y + b.astype(jnp.float32)
    return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps=1e-6, unit_offset=False, axis_name="embed"):
        self.eps, self.unit_offset = eps, unit_offset
        init = zeros_param if unit_offset else ones_param
        self.scale = init((dim,), (axis_name,))

    def __call__(self, x):
        return rms_norm_reference(x, self.scale[...], self.eps, self.unit_offset)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, *, eps=1e-5, use_bias=True, axis_name="embed"):
        self.eps = eps
        self.scale = ones_param((dim,), (axis_name,))
        self.bias = zeros_param((dim,), (axis_name,)) if use_bias else None

    def __call__(self, x):
        return layer_norm_reference(x, self.scale[...], None if self.bias is None else self.bias[...], self.eps)


def make_norm(cfg, dim: int | None = None, axis_name: str = "embed") -> nnx.Module:
    """The norm named by `cfg.norm`, over `dim` (default d_model)."""
    check_choice("model.norm", cfg.norm, NORMS)
    dim = cfg.d_model if dim is None else dim
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, eps=cfg.norm_eps, unit_offset=cfg.rmsnorm_unit_offset, axis_name=axis_name)
    return LayerNorm(dim, eps=cfg.norm_eps, use_bias=cfg.norm_bias, axis_name=axis_name)
