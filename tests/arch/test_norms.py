"""RMSNorm and LayerNorm against their formulas written in numpy (float64)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from arch.norms import LayerNorm, RMSNorm, layer_norm_reference, make_norm, rms_norm_reference
from configs.base import model_defaults


def np_rms_norm(x, w, eps, unit_offset=False):
    """Zhang & Sennrich 2019: x / sqrt(mean(x^2) + eps) * g; Gemma: g = 1 + w."""
    x = np.asarray(x, np.float64)
    g = 1.0 + np.asarray(w, np.float64) if unit_offset else np.asarray(w, np.float64)
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * g


def np_layer_norm(x, w, b, eps):
    """Ba et al. 2016: (x - mu) / sqrt(sigma^2 + eps) * g + b, biased variance."""
    x = np.asarray(x, np.float64)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps) * np.asarray(w, np.float64)
    return y if b is None else y + np.asarray(b, np.float64)


def rand(shape, seed, dtype=jnp.float32, scale=1.0, shift=0.0):
    # numpy draws: no per-shape XLA compile for test inputs.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale + shift, dtype)


@pytest.mark.parametrize("unit_offset", [False, True])
def test_rmsnorm_module_matches_formula(unit_offset):
    norm = RMSNorm(24, eps=1e-6, unit_offset=unit_offset)
    # The module initialises to the identity scale: w = 1, or w = 0 with the (1 + w) offset.
    chex.assert_trees_all_equal(norm.scale[...], jnp.full((24,), 0.0 if unit_offset else 1.0))
    w = rand((24,), 1, scale=0.5)
    norm.scale[...] = w
    x = rand((2, 5, 24), 0, scale=3.0)
    chex.assert_trees_all_close(np.asarray(norm(x)), np_rms_norm(x, w, 1e-6, unit_offset), atol=1e-5, rtol=1e-5)


def test_rmsnorm_eps_matters_for_tiny_inputs():
    x = rand((3, 8), 0, scale=1e-4)
    w = jnp.ones((8,))
    chex.assert_trees_all_close(np.asarray(rms_norm_reference(x, w, 1e-2)), np_rms_norm(x, w, 1e-2), atol=1e-7)


@pytest.mark.parametrize("use_bias", [True, False])
def test_layernorm_module_matches_formula(use_bias):
    norm = LayerNorm(20, eps=1e-5, use_bias=use_bias)
    assert (norm.bias is None) == (not use_bias)
    w = rand((20,), 1, scale=0.5, shift=1.0)
    norm.scale[...] = w
    b = None
    if use_bias:
        b = rand((20,), 2)
        norm.bias[...] = b
    x = rand((2, 3, 20), 0, scale=2.0, shift=5.0)  # large mean: tests the centring
    chex.assert_trees_all_close(np.asarray(norm(x)), np_layer_norm(x, w, b, 1e-5), atol=1e-5, rtol=1e-5)


def test_bf16_input_is_normalised_in_f32():
    x = rand((4, 64), 0, jnp.bfloat16, scale=30.0, shift=100.0)
    w = rand((64,), 1, scale=0.3, shift=1.0)
    x32 = np.asarray(x, np.float32)
    for got, want in [
        (rms_norm_reference(x, w, 1e-6), np_rms_norm(x32, w, 1e-6)),
        (rms_norm_reference(x, w, 1e-6, unit_offset=True), np_rms_norm(x32, w, 1e-6, True)),
        (layer_norm_reference(x, w, None, 1e-5), np_layer_norm(x32, w, None, 1e-5)),
    ]:
        assert got.dtype == jnp.bfloat16
        # One bf16 rounding of the result (8 bits of mantissa), not of the statistics:
        # with mean 100 and std 30, a bf16 variance would be off by far more.
        chex.assert_trees_all_close(np.asarray(got, np.float32), want, atol=1e-2, rtol=8e-3)


@pytest.mark.parametrize("norm,kind", [("rmsnorm", RMSNorm), ("layernorm", LayerNorm)])
def test_make_norm_from_config(norm, kind):
    cfg = model_defaults()
    cfg.norm = norm
    cfg.norm_eps = 1e-3
    cfg.norm_bias = False
    cfg.rmsnorm_unit_offset = True
    m = make_norm(cfg, dim=12)
    assert isinstance(m, kind) and m.eps == 1e-3
    chex.assert_shape(m.scale[...], (12,))
    if norm == "layernorm":
        assert m.bias is None
    else:
        assert m.unit_offset


def test_make_norm_unknown_raises():
    cfg = model_defaults()
    cfg.norm = "batchnorm"
    with pytest.raises(ValueError, match="model.norm.*rmsnorm"):
        make_norm(cfg)


def test_reference_gradients():
    x = rand((3, 8), 0, scale=2.0)
    w, b = rand((8,), 1), rand((8,), 2)
    check_grads(jax.jit(lambda x, w: rms_norm_reference(x, w, 1e-6)), (x, w), order=1, modes=("rev",))
    check_grads(jax.jit(lambda x, w: rms_norm_reference(x, w, 1e-6, unit_offset=True)), (x, w), order=1, modes=("fwd",))
    check_grads(jax.jit(lambda x, w, b: layer_norm_reference(x, w, b, 1e-5)), (x, w, b), order=1, modes=("rev",))


def test_rmsnorm_gradient_matches_closed_form():
    # d/dx [x / r * w] with r = sqrt(mean(x^2) + eps): (w - x * mean(x*w) / r^2 ... ) / r,
    # checked against a numpy Jacobian-vector product (rows independent).
    x = np.asarray(rand((2, 6), 0), np.float64)
    w = np.asarray(rand((6,), 1), np.float64)
    g = np.asarray(rand((2, 6), 2), np.float64)
    eps = 1e-6
    r = np.sqrt((x**2).mean(-1, keepdims=True) + eps)
    n = x.shape[-1]
    gw = g * w
    want = gw / r - x * (gw * x).sum(-1, keepdims=True) / (n * r**3)
    _, vjp = jax.vjp(lambda x: rms_norm_reference(x, jnp.asarray(w, jnp.float32), eps), jnp.asarray(x, jnp.float32))
    chex.assert_trees_all_close(np.asarray(vjp(jnp.asarray(g, jnp.float32))[0]), want, atol=1e-5, rtol=1e-5)
