"""Small helpers every layer shares: dtypes, parameter creation with logical axes, validation.

Parameters carry logical axis names (`embed`, `heads`, `mlp`, ...) as NNX sharding
metadata; `sharding/rules.py` maps them to mesh axes. Layers never name mesh axes.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from arch.precision import check_precision
from arch.precision import dot as precision_dot

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name) -> jnp.dtype:
    if not isinstance(name, str):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} must be one of {sorted(DTYPES)}")
    return DTYPES[name]


def check_choice(field: str, value, allowed: Sequence) -> None:
    """ValueError naming the field and the allowed values."""
    if value not in allowed:
        raise ValueError(f"{field}={value!r} must be one of {tuple(allowed)}")


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], *,
          std: float | None = 0.02, dtype=jnp.float32, init=None) -> nnx.Param:
    """An `nnx.Param` of `shape` with logical `axes`; normal(std) init unless `init` given."""
    if len(shape) != len(axes):
        raise ValueError(f"param shape {tuple(shape)} and axes {tuple(axes)} differ in rank")
    if init is None:
        init = jax.nn.initializers.normal(std) if std else jax.nn.initializers.zeros
    return logical_param(init(rngs.params(), tuple(shape), dtype), axes)


def logical_param(value, axes: Sequence[str | None], cls=nnx.Param) -> nnx.Variable:
    """Wrap `value` with its logical axis names as metadata (`out_sharding`).

    Eager sharding is off: models are built unsharded on CPU and placed by
    `sharding/`, which maps these names to mesh axes with one rules table.
    """
    if value.ndim != len(axes):
        raise ValueError(f"value shape {value.shape} and axes {tuple(axes)} differ in rank")
    return cls(value, out_sharding=tuple(axes), eager_sharding=False)


def ones_param(shape, axes, dtype=jnp.float32) -> nnx.Param:
    return logical_param(jnp.ones(shape, dtype), axes)


def zeros_param(shape, axes, dtype=jnp.float32) -> nnx.Param:
    return logical_param(jnp.zeros(shape, dtype), axes)


class Linear(nnx.Module):
    """y = x @ W (+ b) with W of shape [*in_shape, *out_shape] and logical axes.

    Multi-dim shapes let projections keep heads explicit, e.g. q: [embed] -> [heads, head_dim],
    which keeps QK-Clip and Muon per-head/per-matrix operations readable.
    """

    def __init__(self, in_shape, out_shape, *, in_axes, out_axes, rngs: nnx.Rngs,
                 use_bias=False, std=0.02, dtype=jnp.float32, param_dtype=jnp.float32,
                 precision: str = "bf16"):
        check_precision(precision)
        in_shape, out_shape = tuple(_as_tuple(in_shape)), tuple(_as_tuple(out_shape))
        self.in_ndim = len(in_shape)
        self.precision = precision  # model.matmul_precision (arch/precision.py)
        self.kernel = param(rngs, in_shape + out_shape, tuple(in_axes) + tuple(out_axes),
                            std=std, dtype=param_dtype)
        self.bias = zeros_param(out_shape, out_axes, param_dtype) if use_bias else None
        self.dtype = dtype

    def __call__(self, x):
        w = self.kernel[...].astype(self.dtype)
        nin = self.in_ndim
        if self.precision != "bf16":  # FP8: one [K, N] matmul of the flattened dims
            k = math.prod(w.shape[:nin])
            y = precision_dot(x.astype(self.dtype).reshape(*x.shape[:x.ndim - nin], k),
                    w.reshape(k, -1), self.precision)
            y = y.reshape(*x.shape[:x.ndim - nin], *w.shape[nin:])
        else:
            y = jnp.tensordot(x.astype(self.dtype), w, axes=(tuple(range(x.ndim - nin, x.ndim)), tuple(range(nin))))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def _as_tuple(s):
    return (s,) if isinstance(s, int) else tuple(s)
