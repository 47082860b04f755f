"""Position information: sinusoidal, learned absolute, and rotary embeddings with scalings.

RoPE (Su et al. 2021, RoFormer) rotates each pair of q/k features by angle
`position * inv_freq[i]`, with inv_freq[i] = theta^(-2i/d), so that q_m . k_n depends
only on m - n. Two pairings are in use: rotate-half (GPT-NeoX, Llama, HF) pairs
feature i with i + d/2; interleaved (GPT-J, RoFormer, Meta's original Llama) pairs
2i with 2i+1. Partial rotary (`fraction < 1`) rotates only the first `fraction*d` features.

Context-extension scalings of inv_freq (as in Hugging Face `modeling_rope_utils`):
  linear      Position Interpolation (Chen et al. 2023): inv_freq / factor.
  ntk         NTK-aware (bloc97 2023): theta * factor^(d / (d-2)).
  dynamic_ntk the NTK base grown with the current length past the original context.
  yarn        YaRN (Peng et al. 2023): per-frequency blend of interpolation and
              extrapolation by a linear ramp between beta_fast and beta_slow rotations,
              with attention temperature 0.1 ln(factor) + 1 applied to cos and sin.
  llama3      Llama 3.1: low frequencies / factor, high kept, a smooth band between.

    inv_freq, attn_factor = rope_frequencies(128, 500_000.0, dict(type="llama3", factor=8.0))
    q = apply_rope(q, positions, inv_freq, attention_factor=attn_factor)
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from arch.common import check_choice, logical_param

POSITION_EMBEDDINGS = ("rope", "learned", "sinusoidal", "none")
ROPE_SCALINGS = ("linear", "ntk", "dynamic_ntk", "yarn", "llama3")


# ---------------------------------------------------------------------------- RoPE frequencies


def _default_inv_freq(rot_dim: int, theta: float) -> np.ndarray:
    return 1.0 / (theta ** (np.arange(0, rot_dim, 2, dtype=np.float64) / rot_dim))


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature sqrt(1/t) = 0.1 * mscale * ln(s) + 1 (1 for s <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(rot_dim, theta, factor, original_max, beta_fast=32.0, beta_slow=1.0,
          mscale=None, mscale_all_dim=None, attention_factor=None, truncate=True):
    def correction_dim(num_rotations):
        # The dimension whose wavelength makes `num_rotations` turns over the original context.
        return rot_dim * math.log(original_max / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rot_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(rot_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation_weight = 1.0 - ramp  # 1: keep the original frequency (high frequencies)
    base = _default_inv_freq(rot_dim, theta)
    inv_freq = base / factor * (1 - extrapolation_weight) + base * extrapolation_weight
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    return inv_freq, attention_factor


def _llama3(rot_dim, theta, factor, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=8192):
    inv_freq = _default_inv_freq(rot_dim, theta)
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    if high_freq_factor == low_freq_factor:  # no middle band (Llama 4 Scout)
        return scaled
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled)


def rope_frequencies(rot_dim: int, theta: float, scaling=None):
    """Static inverse frequencies [rot_dim // 2] and the attention factor for cos/sin.

    `dynamic_ntk` depends on the sequence length and is handled in `dynamic_ntk_inv_freq`;
    here it returns the unscaled frequencies.
    """
    if rot_dim % 2:
        raise ValueError(f"rotary dim {rot_dim=} must be even")
    if not scaling:
        return _default_inv_freq(rot_dim, theta), 1.0
    s = dict(scaling)
    kind = s.pop("type")
    check_choice("model.rope_scaling.type", kind, ROPE_SCALINGS)
    factor = float(s.pop("factor", 1.0))
    if factor < 1.0:
        raise ValueError(f"model.rope_scaling.factor={factor} must be >= 1")
    if kind == "linear":
        return _default_inv_freq(rot_dim, theta) / factor, 1.0
    if kind == "ntk":
        return _default_inv_freq(rot_dim, theta * factor ** (rot_dim / (rot_dim - 2))), 1.0
    if kind == "dynamic_ntk":
        return _default_inv_freq(rot_dim, theta), 1.0
    if kind == "yarn":
        original = s.pop("original_max_position_embeddings")
        return _yarn(rot_dim, theta, factor, original, **s)
    return _llama3(rot_dim, theta, factor, **s), 1.0


def dynamic_ntk_inv_freq(rot_dim: int, theta: float, factor: float, original_max: int, seq_len):
    """Dynamic NTK (HF): base grows once the sequence is longer than the original context."""
    seq_len = jnp.maximum(jnp.asarray(seq_len, jnp.float32), original_max)
    base = theta * ((factor * seq_len / original_max) - (factor - 1)) ** (rot_dim / (rot_dim - 2))
    return 1.0 / (base ** (jnp.arange(0, rot_dim, 2, dtype=jnp.float32) / rot_dim))


# ---------------------------------------------------------------------------- applying RoPE


def apply_rope(x, positions, inv_freq, *, interleaved: bool = False, attention_factor: float = 1.0):
    """Rotate the first 2*len(inv_freq) features of x [B, T, H, D] by positions [B, T]."""
    rot = 2 * inv_freq.shape[-1]
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [B, T, rot/2]
    cos = (jnp.cos(angles) * attention_factor)[:, :, None, :]  # [B, T, 1, rot/2]
    sin = (jnp.sin(angles) * attention_factor)[:, :, None, :]
    xr, xpass = x[..., :rot].astype(jnp.float32), x[..., rot:]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(xr.shape)
    else:
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([out.astype(x.dtype), xpass], axis=-1) if xpass.shape[-1] else out.astype(x.dtype)


class RoPE:
    """RoPE for one layer kind, from the model config (not a module: no parameters).

    Gemma 3 uses a different base on local (sliding-window) layers: `rope_local_theta`,
    and applies the context scaling only to global layers unless `rope_local_scaling`.
    """

    def __init__(self, cfg, rot_dim: int, *, local: bool = False):
        theta = cfg.rope_theta
        scaling = cfg.rope_scaling
        if local:
            theta = cfg.rope_local_theta or theta
            if not cfg.rope_local_scaling:
                scaling = None
        self.rot_dim, self.theta = rot_dim, theta
        self.interleaved = cfg.rope_interleaved
        self.scaling = dict(scaling) if scaling else None
        inv_freq, self.attention_factor = rope_frequencies(rot_dim, theta, self.scaling)
        self.inv_freq = np.asarray(inv_freq, np.float32)

    def __call__(self, x, positions):
        inv_freq = self.inv_freq
        if self.scaling and self.scaling["type"] == "dynamic_ntk":
            inv_freq = dynamic_ntk_inv_freq(
                self.rot_dim, self.theta, self.scaling["factor"],
                self.scaling["original_max_position_embeddings"], jnp.max(positions) + 1)
        return apply_rope(x, positions, inv_freq, interleaved=self.interleaved,
                          attention_factor=self.attention_factor)


def rotary_dim(head_dim: int, fraction: float) -> int:
    rot = int(head_dim * fraction)
    if rot % 2 or not 0 < fraction <= 1:
        raise ValueError(f"model.rope_fraction={fraction} must give an even rotary dim in (0, {head_dim}]")
    return rot


# ---------------------------------------------------------------------------- absolute positions


def sinusoidal_table(max_len: int, dim: int) -> np.ndarray:
    """Vaswani et al. 2017: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...)."""
    pos = np.arange(max_len, dtype=np.float64)[:, None]
    div = np.exp(np.arange(0, dim, 2, dtype=np.float64) * (-math.log(10000.0) / dim))
    table = np.zeros((max_len, dim))
    table[:, 0::2] = np.sin(pos * div)
    table[:, 1::2] = np.cos(pos * div)[:, : dim // 2]
    return table.astype(np.float32)


class LearnedPositions(nnx.Module):
    """GPT-2 / BERT learned absolute position embeddings [max_seq_len, embed]."""

    def __init__(self, max_len: int, dim: int, *, rngs: nnx.Rngs, std: float = 0.02):
        import jax  # local: only needed for init

        self.embedding = logical_param(
            jax.random.normal(rngs.params(), (max_len, dim)) * std, (None, "embed"))

    def __call__(self, positions):
        return jnp.take(self.embedding[...], positions, axis=0)


class SinusoidalPositions:
    def __init__(self, max_len: int, dim: int):
        self.table = sinusoidal_table(max_len, dim)

    def __call__(self, positions):
        return jnp.take(jnp.asarray(self.table), positions, axis=0)
