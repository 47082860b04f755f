"""Feed-forward layers against numpy formulas, using the module's own weights."""
import math

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arch.mlp import MLP, activation_fn
from configs.base import model_defaults

_erf = np.vectorize(math.erf)


def np_gelu_exact(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def np_gelu_tanh(x):  # Hendrycks & Gimpel 2016, eq. for the tanh approximation
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def np_silu(x):
    return x / (1.0 + np.exp(-x))


def np_relu(x):
    return np.maximum(x, 0.0)


# name -> (activation, gated). GeGLU uses the tanh GELU, as Gemma and T5 v1.1 do.
NP_ACTIVATIONS = {
    "swiglu": (np_silu, True),
    "geglu": (np_gelu_tanh, True),
    "gelu": (np_gelu_exact, False),
    "gelu_tanh": (np_gelu_tanh, False),
    "relu": (np_relu, False),
    "relu2": (lambda x: np_relu(x) ** 2, False),
    "silu": (np_silu, False),
}


def np_weights(linear):
    w = np.asarray(linear.kernel[...], np.float64)
    b = None if linear.bias is None else np.asarray(linear.bias[...], np.float64)
    return w, b


def np_linear(x, linear):
    w, b = np_weights(linear)
    y = x @ w
    return y if b is None else y + b


@nnx.jit
def forward(mlp, x):  # one compile per configuration instead of one per eager op
    return mlp(x)


@pytest.mark.parametrize("name,bias", [(n, False) for n in sorted(NP_ACTIVATIONS)] + [("swiglu", True), ("relu2", True)])
def test_mlp_matches_formula(name, bias):
    cfg = model_defaults()
    cfg.activation, cfg.mlp_bias = name, bias
    cfg.d_model, cfg.mlp_dim, cfg.init_std = 16, 24, 0.3  # large weights: activations leave the linear regime
    mlp = MLP(cfg, rngs=nnx.Rngs(0))
    act, gated = NP_ACTIVATIONS[name]
    assert (mlp.gate is not None) == gated
    if bias:  # biases start at zero; make them matter
        for lin in (mlp.up, mlp.down) + ((mlp.gate,) if gated else ()):
            lin.bias[...] = jnp.asarray(np.random.default_rng(7).standard_normal(lin.bias[...].shape) * 0.5, jnp.float32)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, 16)), jnp.float32)
    xn = np.asarray(x, np.float64)
    # Shazeer 2020: FFN_GLU(x) = (act(x W) * x V) W2; plain: act(x W1) W2.
    h = act(np_linear(xn, mlp.gate)) * np_linear(xn, mlp.up) if gated else act(np_linear(xn, mlp.up))
    want = np_linear(h, mlp.down)
    got = forward(mlp, x)
    chex.assert_shape(got, (2, 5, 16))
    chex.assert_trees_all_close(np.asarray(got), want, atol=1e-5, rtol=1e-4)


def test_mlp_dim_override_and_bf16_compute():
    cfg = model_defaults()
    cfg.dtype = "bfloat16"
    mlp = MLP(cfg, rngs=nnx.Rngs(0), mlp_dim=40)
    chex.assert_shape(mlp.up.kernel[...], (cfg.d_model, 40))
    assert mlp.up.kernel[...].dtype == jnp.float32  # params stay f32
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 3, cfg.d_model)), jnp.float32)
    y = forward(mlp, x)
    assert y.dtype == jnp.bfloat16
    xn = np.asarray(x, np.float64)
    want = np_linear(np_silu(np_linear(xn, mlp.gate)) * np_linear(xn, mlp.up), mlp.down)
    chex.assert_trees_all_close(np.asarray(y, np.float32), want, atol=2e-3, rtol=5e-2)


def test_activation_values_spot_check():
    x = np.linspace(-4, 4, 33)
    for name, (np_act, _) in NP_ACTIVATIONS.items():
        act, _ = activation_fn(name)
        np.testing.assert_allclose(np.asarray(act(jnp.asarray(x, jnp.float32))), np_act(x), atol=1e-6, err_msg=name)
    # exact and tanh GELU really differ (so each case above can tell them apart)
    assert np.max(np.abs(np_gelu_exact(x) - np_gelu_tanh(x))) > 1e-4


def test_unknown_activation_raises_naming_field():
    cfg = model_defaults()
    cfg.activation = "swish_glu"
    with pytest.raises(ValueError, match=r"model\.activation.*swiglu"):
        MLP(cfg, rngs=nnx.Rngs(0))
