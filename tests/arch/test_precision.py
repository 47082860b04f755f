"""FP8 matmuls (arch/precision.py) against a numpy re-derivation of the same quantisation:
scales, round-to-nearest-even, saturation, the three scalings, and the backward's."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from arch import precision
from arch.precision import BLOCK, dot, quantize, quantize_blockwise

E4M3, E5M2 = ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2


def np_fake_quant(x, dtype, rows=None, cols=None, axes=None):
    """x -> dequantised float64: per-slice amax scaling to the format's max, saturated,
    rounded to nearest even by ml_dtypes. Slices: `axes` reduced, or rows x cols blocks."""
    x = np.asarray(x, np.float64)
    fmax = float(ml_dtypes.finfo(dtype).max)
    if rows is not None:
        r, c = x.shape
        out = np.empty_like(x)
        for i in range(0, r, rows):
            for j in range(0, c, cols):
                out[i:i + rows, j:j + cols] = np_fake_quant(x[i:i + rows, j:j + cols], dtype)
        return out
    amax = np.abs(x).max(axis=axes, keepdims=True)
    scale = np.where(amax > 0, amax / fmax, 1.0)
    q = np.clip(x / scale, -fmax, fmax).astype(np.float32).astype(dtype)
    return q.astype(np.float64) * scale


def np_forward(x, w, mode):
    if mode == "fp8_tensorwise":
        return np_fake_quant(x, E4M3) @ np_fake_quant(w, E4M3)
    if mode == "fp8_rowwise":
        return np_fake_quant(x, E4M3, axes=1) @ np_fake_quant(w, E4M3, axes=0)
    return np_fake_quant(x, E4M3, 1, BLOCK) @ np_fake_quant(w, E4M3, BLOCK, BLOCK)


def np_backward(x, w, dy, mode):
    if mode == "fp8_tensorwise":
        q = np_fake_quant(dy, E5M2)
        return q @ np_fake_quant(w, E4M3).T, np_fake_quant(x, E4M3).T @ q
    if mode == "fp8_rowwise":
        dx = np_fake_quant(dy, E5M2, axes=1) @ np_fake_quant(w, E4M3, axes=1).T
        dw = np_fake_quant(x, E4M3, axes=0).T @ np_fake_quant(dy, E5M2, axes=0)
        return dx, dw
    dx = np_fake_quant(dy, E5M2, 1, BLOCK) @ np_fake_quant(w, E4M3, BLOCK, BLOCK).T
    dw = np_fake_quant(x.T, E4M3, 1, BLOCK) @ np_fake_quant(dy, E5M2, BLOCK, BLOCK)
    return dx, dw


def test_quantize_rounds_to_nearest_even_and_saturates():
    # amax 448 -> scale 1: values land on the E4M3 grid as they are. Between 1 and 2 the
    # grid step is 1/8: 1.0625 is a tie (to 1.0, even), 1.1875 a tie (to 1.25).
    x = jnp.array([448.0, 1.0625, 1.1875, -3.3, 0.0])
    q, s = quantize(x, None)
    assert float(s.reshape(())) == 1.0
    np.testing.assert_array_equal(np.asarray(q.astype(jnp.float32)), [448, 1.0, 1.25, -3.25, 0])
    # Saturation: a per-row scale from one row never lets another row's value overflow.
    q, s = quantize(jnp.array([[1e6, 1.0], [2.0, -1e-3]]), (1,))
    np.testing.assert_allclose(np.asarray(s)[:, 0], [1e6 / 448, 2 / 448], rtol=1e-6)
    assert float(jnp.max(jnp.abs(q.astype(jnp.float32)))) == 448.0
    # An all-zero slice: scale 1, zeros (no 0/0).
    q, s = quantize(jnp.zeros((2, 3)), (1,))
    assert np.all(np.asarray(s) == 1.0) and not np.any(np.asarray(q.astype(jnp.float32)))


def test_blockwise_scales_have_one_value_per_block():
    x = np.random.default_rng(0).normal(size=(256, 384)).astype(np.float32)
    x[:128, 128:256] *= 100                         # one loud block
    _, s = quantize_blockwise(jnp.asarray(x), BLOCK, BLOCK)
    assert s.shape == (2, 3)
    want = np.abs(x).reshape(2, 128, 3, 128).max(axis=(1, 3)) / 448
    np.testing.assert_allclose(np.asarray(s), want, rtol=1e-6)
    _, s = quantize_blockwise(jnp.asarray(x), 1, BLOCK)
    assert s.shape == (256, 3)


@pytest.mark.parametrize("mode", ["fp8_tensorwise", "fp8_rowwise", "fp8_blockwise"])
def test_fp8_dot_values_and_grads_match_numpy(mode):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(256, 256)).astype(np.float32) * np.exp(rng.normal(size=(256, 1)))
    w = (rng.normal(size=(256, 128)) * 0.05).astype(np.float32)
    dy = rng.normal(size=(256, 128)).astype(np.float32) * 1e-3
    y, vjp = jax.vjp(lambda a, b: dot(a, b, mode), jnp.asarray(x), jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(y), np_forward(x, w, mode), rtol=2e-5, atol=2e-5)
    dx, dw = vjp(jnp.asarray(dy))
    want_dx, want_dw = np_backward(x, w, dy, mode)
    np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=2e-5, atol=1e-8)
    np.testing.assert_allclose(np.asarray(dw), want_dw, rtol=2e-5, atol=1e-7)
    # And FP8 stays near the exact product (E4M3 keeps 3 mantissa bits).
    exact = x.astype(np.float64) @ w
    assert np.abs(np.asarray(y) - exact).max() < 0.1 * np.abs(exact).max()


def test_linear_with_fp8_is_the_flattened_dot_and_bad_values_are_refused():
    from flax import nnx

    from arch.common import Linear
    x = jax.random.normal(jax.random.key(0), (2, 3, 8))
    lin = Linear(8, (2, 4), in_axes=("embed",), out_axes=("heads", "head_dim"),
                 rngs=nnx.Rngs(0), precision="fp8_rowwise")
    want = dot(x.reshape(6, 8), lin.kernel[...].reshape(8, 8), "fp8_rowwise").reshape(2, 3, 2, 4)
    np.testing.assert_array_equal(np.asarray(lin(x)), np.asarray(want))
    with pytest.raises(ValueError, match="model.matmul_precision='fp8' must be one of"):
        precision.check_precision("fp8")
    with pytest.raises(ValueError, match="divisible by 128; got \\[8, 8\\]"):
        dot(x.reshape(6, 8), jnp.ones((8, 8)), "fp8_blockwise")


def test_a_tiny_model_in_fp8_is_near_its_bf16_loss():
    import arch
    from configs.llama3 import get_config
    cfg = get_config("tiny")
    cfg.model.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                     mlp_dim=64, max_seq_len=16, vocab_size=64)
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)

    def loss(precision):
        cfg.model.matmul_precision = precision
        model = arch.build_model(cfg.model, nnx_rngs())
        logits, _ = nnx_jit(lambda m, t: m(t, positions=jnp.broadcast_to(jnp.arange(16), (2, 16))))(
            model, tokens)
        return float(jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
            logits, tokens[..., None], -1)[..., 0]))

    base = loss("bf16")
    assert abs(loss("fp8_rowwise") - base) < 0.02 * base
    cfg.model.matmul_precision = "int8"
    with pytest.raises(ValueError, match="model.matmul_precision='int8'"):
        arch.count_params(cfg.model)


def nnx_rngs():
    from flax import nnx
    return nnx.Rngs(params=0)


def nnx_jit(f):
    from flax import nnx
    return nnx.jit(f)


# ----------------------------------------------------------------------------- MoE experts
def np_grouped(x, w, dy, sizes, mode):
    """The grouped FP8 matmul and its backward in numpy: per expert g, its rows of x times
    w[g]; rowwise scales per row of x / dy and per (expert, column) of w; dW's per column
    over all rows; tensorwise one scale per x, dy and expert matrix; gradients E4M3."""
    rowwise = mode == "fp8_rowwise"
    fq = lambda a, axes: np_fake_quant(a, E4M3, axes=axes)  # noqa: E731
    xq, dyq = fq(x, 1 if rowwise else None), fq(dy, 1 if rowwise else None)
    xq_col, dyq_col = fq(x, 0 if rowwise else None), fq(dy, 0 if rowwise else None)
    y, dx = np.zeros(dy.shape), np.zeros(x.shape)
    dw = np.zeros(w.shape)
    start = 0
    for g, size in enumerate(sizes):
        r = slice(start, start + size)
        y[r] = xq[r] @ fq(w[g], 0 if rowwise else None)
        dx[r] = dyq[r] @ fq(w[g], 1 if rowwise else None).T
        dw[g] = xq_col[r].T @ dyq_col[r]
        start += size
    return y, dx, dw


@pytest.mark.parametrize("impl", ["ragged_dot", "pallas_gpu"])
@pytest.mark.parametrize("mode", ["fp8_tensorwise", "fp8_rowwise"])
def test_grouped_fp8_values_and_grads_match_numpy(mode, impl):
    """Groups with an empty one and rows past sum(group_sizes) (0 in y and dx); the Pallas
    GPU kernel in interpret mode on float8 operands."""
    rng = np.random.default_rng(2)
    sizes, m = [5, 0, 9, 3], 20
    x = rng.normal(size=(m, 32)).astype(np.float32) * np.exp(rng.normal(size=(m, 1)))
    x[17:] = 0.0  # padding rows, as the expert-parallel receive buffers have
    w = (rng.normal(size=(4, 32, 24)) * 0.2).astype(np.float32)
    dy = rng.normal(size=(m, 24)).astype(np.float32)
    gs = jnp.asarray(sizes, jnp.int32)
    y, vjp = jax.vjp(lambda a, b: precision.grouped_dot(a, b, gs, mode, impl=impl),
                     jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(dy))
    want_y, want_dx, want_dw = np_grouped(x, w, dy, sizes, mode)
    np.testing.assert_allclose(np.asarray(y), want_y, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(dw), want_dw, rtol=2e-5, atol=2e-5)


def test_moe_paths_agree_in_fp8_rowwise_and_blockwise_is_refused():
    """The MoE layer in fp8_rowwise: dropless (grouped), capacity (per-expert buffers) and
    the dense reference quantise the same rows and columns, so they agree; bf16 does not."""
    from flax import nnx

    import arch
    from arch.moe import MoE
    from configs.mixtral import get_config
    cfg = get_config("tiny").model
    cfg.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, vocab_size=64)
    cfg.moe.expert_mlp_dim = 48
    x = jax.random.normal(jax.random.key(1), (2, 12, 32))

    def run(dispatch, mode):
        cfg.moe.dispatch, cfg.matmul_precision = dispatch, mode
        cfg.moe.capacity_factor = 8.0 if dispatch == "capacity" else None  # room for every assignment
        layer = MoE(cfg, rngs=nnx.Rngs(params=3))
        return np.asarray(layer(x)[0])

    ref = run("dense", "fp8_rowwise")
    for dispatch in ("dropless", "capacity"):
        np.testing.assert_allclose(run(dispatch, "fp8_rowwise"), ref, rtol=1e-4,
                                   atol=1e-6 * np.abs(ref).max())
    # FP8 did act on the experts: a few % away from the unquantised layer.
    assert np.abs(run("dense", "bf16") - ref).max() > 0.01 * np.abs(ref).max()
    cfg.matmul_precision = "fp8_blockwise"
    with pytest.raises(ValueError, match="model.matmul_precision='fp8_blockwise' is not "
                                         "implemented for the MoE experts"):
        arch.count_params(cfg)
