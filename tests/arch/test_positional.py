"""RoPE, its context-extension scalings, sinusoidal and learned positions.

Every expected value is computed here in numpy from the published formulas
(RoFormer; Position Interpolation; NTK-aware; HF dynamic NTK; YaRN; Llama 3.1;
Vaswani et al.), never from arch/positional.py itself.
"""
import math

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arch import positional
from arch.positional import RoPE, apply_rope, rope_frequencies, rotary_dim, sinusoidal_table
from configs.base import model_defaults

# ------------------------------------------------------------------ numpy references


def np_inv_freq(dim, theta):
    """theta^(-2i/d), i = 0 .. d/2-1 (RoFormer eq. 15)."""
    return np.array([theta ** (-2.0 * i / dim) for i in range(dim // 2)])


def np_rope_complex(x, positions, inv_freq, *, interleaved, attention_factor=1.0):
    """Rotation as complex multiplication: z_i * exp(i * pos * inv_freq_i).

    Rotate-half pairs feature i with i + rot/2; interleaved pairs 2i with 2i+1.
    Features past 2*len(inv_freq) are left as they are.
    """
    x = np.asarray(x, np.float64)
    rot = 2 * len(inv_freq)
    xr, tail = x[..., :rot], x[..., rot:]
    if interleaved:
        z = xr[..., 0::2] + 1j * xr[..., 1::2]
    else:
        z = xr[..., : rot // 2] + 1j * xr[..., rot // 2:]
    ang = np.asarray(positions, np.float64)[:, :, None, None] * np.asarray(inv_freq)  # [B, T, 1, rot/2]
    z = z * np.exp(1j * ang) * attention_factor
    out = np.empty_like(xr)
    if interleaved:
        out[..., 0::2], out[..., 1::2] = z.real, z.imag
    else:
        out[..., : rot // 2], out[..., rot // 2:] = z.real, z.imag
    return np.concatenate([out, tail], axis=-1)


def rand(shape, seed=0, dtype=jnp.float32):
    # numpy draws: no per-shape XLA compile for test inputs.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def positions_of(b, t, offset=0):
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + offset, (b, t))


# ------------------------------------------------------------------ applying RoPE


@pytest.mark.parametrize("interleaved", [False, True])
def test_apply_rope_matches_complex_rotation(interleaved):
    x = rand((2, 7, 3, 16))
    pos = jnp.array([[0, 1, 2, 3, 4, 5, 6], [9, 3, 100, 0, 17, 1023, 4]], jnp.int32)
    inv = np_inv_freq(16, 10000.0)
    got = apply_rope(x, pos, inv, interleaved=interleaved)
    want = np_rope_complex(x, pos, inv, interleaved=interleaved)
    chex.assert_trees_all_close(np.asarray(got), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("interleaved", [False, True])
def test_scores_depend_only_on_relative_position(interleaved):
    cfg = model_defaults()
    cfg.rope_interleaved = interleaved
    rope = RoPE(cfg, 16)
    q, k = rand((1, 9, 2, 16), 1), rand((1, 9, 2, 16), 2)

    def scores(offset):
        pos = positions_of(1, 9, offset)
        return jnp.einsum("bqhd,bkhd->bhqk", rope(q, pos), rope(k, pos))

    base = scores(0)
    chex.assert_trees_all_close(scores(37), base, atol=1e-4)
    chex.assert_trees_all_close(scores(1000), base, atol=1e-3)
    # And rotation does change scores (so the test above can fail).
    plain = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    assert float(jnp.max(jnp.abs(plain - base))) > 1e-2


def test_rotate_half_equals_interleaved_under_feature_permutation():
    d = 16
    # Interleaved feature 2i <-> rotate-half feature i, 2i+1 <-> i + d/2.
    perm = np.concatenate([np.arange(0, d, 2), np.arange(1, d, 2)])  # half[j] = inter[perm[j]]
    x_inter = np.asarray(rand((2, 5, 3, d)))
    x_half = x_inter[..., perm]
    pos = positions_of(2, 5, 3)
    inv = np_inv_freq(d, 10000.0)
    y_inter = apply_rope(x_inter, pos, inv, interleaved=True)
    y_half = apply_rope(x_half, pos, inv, interleaved=False)
    chex.assert_trees_all_close(np.asarray(y_half), np.asarray(y_inter)[..., perm], atol=1e-5)


@pytest.mark.parametrize("interleaved", [False, True])
def test_partial_rotary_leaves_tail_untouched(interleaved):
    cfg = model_defaults()
    cfg.rope_fraction = 0.25
    cfg.rope_interleaved = interleaved
    head_dim = 32
    rot = rotary_dim(head_dim, cfg.rope_fraction)
    assert rot == 8
    rope = RoPE(cfg, rot)
    x = rand((2, 6, 2, head_dim))
    pos = positions_of(2, 6, 5)
    y = rope(x, pos)
    chex.assert_trees_all_equal(y[..., rot:], x[..., rot:])
    want = np_rope_complex(np.asarray(x[..., :rot]), pos, np_inv_freq(rot, cfg.rope_theta),
                           interleaved=interleaved)
    chex.assert_trees_all_close(np.asarray(y[..., :rot]), want, atol=2e-5)


def test_bf16_input_keeps_dtype_and_matches_f32_formula():
    x = rand((1, 5, 2, 16), dtype=jnp.bfloat16)
    pos = positions_of(1, 5, 11)
    inv = np_inv_freq(16, 10000.0)
    y = apply_rope(x, pos, inv)
    assert y.dtype == jnp.bfloat16
    want = np_rope_complex(np.asarray(x, np.float32), pos, inv, interleaved=False)
    chex.assert_trees_all_close(np.asarray(y, np.float32), want, atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("bad", [0.2, 0.0, 1.5])  # 0.2 * 16 -> 3 features: odd
def test_rotary_dim_rejects_bad_fraction(bad):
    with pytest.raises(ValueError, match="model.rope_fraction"):
        rotary_dim(16, bad)


# ------------------------------------------------------------------ scaled frequencies


def test_no_scaling_is_the_roformer_frequencies():
    inv, af = rope_frequencies(64, 500_000.0, None)
    chex.assert_trees_all_close(np.asarray(inv), np_inv_freq(64, 500_000.0), rtol=1e-12)
    assert af == 1.0


def test_linear_position_interpolation():
    inv, af = rope_frequencies(32, 10000.0, dict(type="linear", factor=4.0))
    # PI (Chen et al. 2023): position m -> m / s, i.e. every frequency / s.
    chex.assert_trees_all_close(np.asarray(inv), np_inv_freq(32, 10000.0) / 4.0, rtol=1e-12)
    assert af == 1.0


def test_ntk_aware_base():
    d, theta, s = 32, 10000.0, 8.0
    inv, af = rope_frequencies(d, theta, dict(type="ntk", factor=s))
    base = theta * s ** (d / (d - 2))
    chex.assert_trees_all_close(np.asarray(inv), np_inv_freq(d, base), rtol=1e-10)
    assert af == 1.0
    # Highest frequency unchanged; lowest scaled by ~1/s.
    ref = np_inv_freq(d, theta)
    assert inv[0] == pytest.approx(ref[0])
    assert inv[-1] == pytest.approx(ref[-1] / s, rel=1e-9)


def hf_dynamic_ntk(dim, theta, factor, original_max, seq_len):
    """transformers `_compute_dynamic_ntk_parameters` / dynamic_rope_update."""
    if seq_len > original_max:
        theta = theta * ((factor * seq_len / original_max) - (factor - 1)) ** (dim / (dim - 2))
    return np_inv_freq(dim, theta)


@pytest.mark.parametrize("seq_len", [10, 64, 65, 200])
def test_dynamic_ntk_frequencies(seq_len):
    d, theta, s, orig = 16, 10000.0, 4.0, 64
    got = positional.dynamic_ntk_inv_freq(d, theta, s, orig, seq_len)
    chex.assert_trees_all_close(np.asarray(got), hf_dynamic_ntk(d, theta, s, orig, seq_len), rtol=2e-5)


def test_dynamic_ntk_rope_grows_base_only_past_original_max():
    cfg = model_defaults()
    d, orig = 16, 32
    cfg.rope_scaling = dict(type="dynamic_ntk", factor=4.0, original_max_position_embeddings=orig)
    rope = RoPE(cfg, d)
    x = rand((1, 8, 2, d))
    for offset in (0, 20, 90):  # max position + 1: 8, 28 (short), 98 (long)
        pos = positions_of(1, 8, offset)
        want_inv = hf_dynamic_ntk(d, cfg.rope_theta, 4.0, orig, offset + 8)
        want = np_rope_complex(x, pos, want_inv, interleaved=False)
        chex.assert_trees_all_close(np.asarray(rope(x, pos)), want, atol=1e-4, rtol=1e-4)
    # Past the original context the base really changed.
    assert not np.allclose(hf_dynamic_ntk(d, cfg.rope_theta, 4.0, orig, 98), np_inv_freq(d, cfg.rope_theta))


def yarn_reference(dim, theta, factor, orig, beta_fast=32.0, beta_slow=1.0):
    """YaRN (Peng et al. 2023, sec. 3.2 / HF `_compute_yarn_parameters`), written out."""
    # r(d) = L / lambda_d with lambda_d = 2 pi theta^(2d/|D|); solve r(d) = beta for d.
    def dim_for_rotations(beta):
        return dim * math.log(orig / (beta * 2 * math.pi)) / (2 * math.log(theta))

    lo = max(math.floor(dim_for_rotations(beta_fast)), 0)
    hi = min(math.ceil(dim_for_rotations(beta_slow)), dim - 1)
    inv = np_inv_freq(dim, theta)
    out = np.empty_like(inv)
    for i in range(dim // 2):
        gamma = min(max((i - lo) / (hi - lo), 0.0), 1.0)  # 0: extrapolate, 1: interpolate
        out[i] = (1 - gamma) * inv[i] + gamma * inv[i] / factor
    return out, lo, hi


def test_yarn_frequencies_and_attention_factor():
    dim, theta, s, orig = 128, 10000.0, 4.0, 4096
    inv, af = rope_frequencies(dim, theta, dict(type="yarn", factor=s, original_max_position_embeddings=orig))
    want, lo, hi = yarn_reference(dim, theta, s, orig)
    assert (lo, hi) == (20, 46)  # floor(20.9), ceil(45.0) for these numbers
    chex.assert_trees_all_close(np.asarray(inv), want, rtol=1e-10)
    base = np_inv_freq(dim, theta)
    np.testing.assert_allclose(inv[: lo + 1], base[: lo + 1], rtol=1e-12)  # high freq kept
    np.testing.assert_allclose(inv[hi:], base[hi:] / s, rtol=1e-12)         # low freq interpolated
    mid = inv[lo + 1: hi] / base[lo + 1: hi]
    assert np.all(np.diff(mid) < 0) and np.all((mid > 1 / s) & (mid < 1))  # a smooth blend
    assert af == pytest.approx(0.1 * math.log(s) + 1)


def test_yarn_mscale_ratio():
    s = 40.0
    inv, af = rope_frequencies(64, 10000.0, dict(type="yarn", factor=s, original_max_position_embeddings=4096,
                                                  mscale=0.707, mscale_all_dim=1.0))
    want = (0.1 * 0.707 * math.log(s) + 1) / (0.1 * 1.0 * math.log(s) + 1)
    assert af == pytest.approx(want)
    # DeepSeek-V3 sets both to 1: the ratio is exactly 1.
    _, af1 = rope_frequencies(64, 10000.0, dict(type="yarn", factor=s, original_max_position_embeddings=4096,
                                                 mscale=1.0, mscale_all_dim=1.0))
    assert af1 == pytest.approx(1.0)


def test_yarn_attention_factor_scales_rotated_output():
    cfg = model_defaults()
    s = 8.0
    cfg.rope_scaling = dict(type="yarn", factor=s, original_max_position_embeddings=64)
    rope = RoPE(cfg, 16)
    x = rand((1, 6, 2, 16))
    pos = positions_of(1, 6, 3)
    want_inv, _, _ = yarn_reference(16, cfg.rope_theta, s, 64)
    want = np_rope_complex(x, pos, want_inv, interleaved=False, attention_factor=0.1 * math.log(s) + 1)
    chex.assert_trees_all_close(np.asarray(rope(x, pos)), want, atol=2e-5, rtol=1e-5)


def llama31_reference(dim, theta, factor=8.0, low=1.0, high=4.0, orig=8192):
    """Meta's `apply_scaling` (llama-models, Llama 3.1), one frequency at a time."""
    out, bands = [], []
    for f in np_inv_freq(dim, theta):
        wavelen = 2 * math.pi / f
        if wavelen < orig / high:
            out.append(f)
            bands.append("high")
        elif wavelen > orig / low:
            out.append(f / factor)
            bands.append("low")
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
            bands.append("mid")
    return np.array(out), np.array(bands)


def test_llama31_three_bands():
    dim, theta = 128, 500_000.0
    inv, af = rope_frequencies(dim, theta, dict(type="llama3", factor=8.0, low_freq_factor=1.0,
                                                high_freq_factor=4.0, original_max_position_embeddings=8192))
    want, bands = llama31_reference(dim, theta)
    assert set(bands) == {"high", "mid", "low"}
    chex.assert_trees_all_close(np.asarray(inv), want, rtol=1e-10)
    base = np_inv_freq(dim, theta)
    np.testing.assert_allclose(inv[bands == "high"], base[bands == "high"], rtol=1e-14)
    np.testing.assert_allclose(inv[bands == "low"], base[bands == "low"] / 8, rtol=1e-12)
    ratio = inv[bands == "mid"] / base[bands == "mid"]
    assert np.all((ratio > 1 / 8) & (ratio < 1)) and np.all(np.diff(ratio) < 0)
    assert af == 1.0


def test_scaling_errors_name_the_field():
    with pytest.raises(ValueError, match="model.rope_scaling.type"):
        rope_frequencies(16, 1e4, dict(type="longrope", factor=2.0))
    with pytest.raises(ValueError, match="model.rope_scaling.factor"):
        rope_frequencies(16, 1e4, dict(type="linear", factor=0.5))
    with pytest.raises(ValueError, match="rot_dim"):
        rope_frequencies(15, 1e4, None)


# ------------------------------------------------------------------ Gemma 3 local/global bases


def test_gemma3_local_theta_and_no_local_scaling():
    cfg = model_defaults()
    cfg.rope_theta = 1_000_000.0
    cfg.rope_local_theta = 10_000.0
    cfg.rope_scaling = dict(type="linear", factor=8.0)
    d = 16
    glob, loc = RoPE(cfg, d), RoPE(cfg, d, local=True)
    chex.assert_trees_all_close(glob.inv_freq, np_inv_freq(d, 1e6) / 8, rtol=1e-6)
    chex.assert_trees_all_close(loc.inv_freq, np_inv_freq(d, 1e4), rtol=1e-6)
    cfg.rope_local_scaling = True
    chex.assert_trees_all_close(RoPE(cfg, d, local=True).inv_freq, np_inv_freq(d, 1e4) / 8, rtol=1e-6)
    # Without a local theta, local layers use the global base.
    cfg.rope_local_theta = None
    cfg.rope_local_scaling = False
    chex.assert_trees_all_close(RoPE(cfg, d, local=True).inv_freq, np_inv_freq(d, 1e6), rtol=1e-6)


# ------------------------------------------------------------------ absolute positions


@pytest.mark.parametrize("dim", [8, 7])
def test_sinusoidal_table_is_vaswani(dim):
    table = sinusoidal_table(50, dim)
    want = np.zeros((50, dim))
    for p in range(50):
        for j in range(dim):
            i = j // 2  # PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(...)
            angle = p / 10000 ** (2 * i / dim)
            want[p, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    chex.assert_trees_all_close(table, want.astype(np.float32), atol=1e-6)
    pos = jnp.array([[0, 3, 49], [7, 7, 1]])
    chex.assert_trees_all_close(positional.SinusoidalPositions(50, dim)(pos), want[np.asarray(pos)].astype(np.float32), atol=1e-6)


def test_learned_positions_lookup():
    emb = positional.LearnedPositions(12, 6, rngs=nnx.Rngs(0))
    table = np.asarray(emb.embedding[...])
    chex.assert_shape(table, (12, 6))
    pos = np.array([[0, 11, 5], [2, 2, 9]])
    chex.assert_trees_all_equal(np.asarray(emb(jnp.asarray(pos))), table[pos])
    assert np.std(table) > 0  # really initialised
