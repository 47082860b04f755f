"""Attention dropout masks from a counter-based hash: the same mask wherever it is drawn.

Dropout on the attention probabilities (Vaswani et al. 2017, sec. 5.4; GPT-2 and
nanoGPT's `attn_dropout`) zeroes each probability p[b, h, i, j] with probability `rate`
and scales the kept ones by 1 / (1 - rate). A kernel that never materialises the
[Tq, Tk] matrix cannot store the mask between its forward and backward, so the mask is
a pure function of (seed, batch, head, query index, key index), as in FlashAttention
(Dao et al. 2022) which regenerates Philox numbers from the same counters. Here the
counter is hashed with a 32-bit integer finaliser (lowbias32: xor-shift / multiply
rounds, Wellons 2018), cheap enough to recompute per tile in forward and backward.

The reference (reference.py) draws the whole [B, H, Tq, Tk] mask with `keep_mask`; the
kernels call the same function on each tile's index arrays, so every implementation
drops exactly the same entries.

    keep = keep_mask(seed, b_idx, h_idx, q_idx, k_idx, rate=0.1)   # bool, broadcast shape
    p_dropped = jnp.where(keep, p / (1 - rate), 0)

Indices are those of the unpadded call: `q_idx` counts query rows 0..Tq-1 and `k_idx`
keys 0..Tk-1, `h_idx` query heads, `b_idx` batch rows.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

_M1 = 0x7FEB352D   # lowbias32 multipliers
_M2 = 0x846CA68B
_GOLDEN = 0x9E3779B9  # 2^32 / phi: spreads consecutive counters before mixing
KEEP_BITS = 24      # the top 24 bits of the hash, compared as a non-negative int32


def _u32(x):
    if isinstance(x, int):  # a Python seed may exceed int32: take it modulo 2^32
        x = np.uint32(x % (1 << 32))
    return jnp.asarray(x).astype(jnp.uint32)


def seed_u32(seed):
    """The seed as keep_mask reads it: a uint32 array (a Python int taken modulo 2^32)."""
    return _u32(seed)


def _mix(x):
    """lowbias32: a bijective 32-bit finaliser with good avalanche."""
    x = x ^ lax.shift_right_logical(x, jnp.uint32(16))
    x = x * jnp.uint32(_M1)
    x = x ^ lax.shift_right_logical(x, jnp.uint32(15))
    x = x * jnp.uint32(_M2)
    return x ^ lax.shift_right_logical(x, jnp.uint32(16))


def keep_threshold(rate: float) -> int:
    """Keep an entry when its 24-bit hash is below this (P(keep) = 1 - rate, to 2^-24)."""
    return int(round((1.0 - rate) * (1 << KEEP_BITS)))


def keep_mask(seed, b_idx, h_idx, q_idx, k_idx, *, rate: float):
    """True where p[b, h, q, k] is kept; arguments broadcast against each other.

    Args:
      seed: uint32/int32 scalar (or array broadcasting with the indices).
      b_idx, h_idx, q_idx, k_idx: integer index arrays (int32).
      rate: the dropout probability, in [0, 1).
    """
    row = _mix(_u32(seed) ^ _mix(_u32(b_idx) * jnp.uint32(_GOLDEN) + _u32(h_idx)))
    x = _mix(row ^ (_u32(q_idx) * jnp.uint32(_GOLDEN)))
    x = _mix(x + _u32(k_idx))
    bits = lax.shift_right_logical(x, jnp.uint32(32 - KEEP_BITS)).astype(jnp.int32)
    return bits < keep_threshold(rate)


def check_dropout(rate, seed, *, where: str = "flash_attention") -> float:
    """The rate as a float; ValueError unless 0 <= rate < 1 and a seed is given when > 0."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(f"{where}: dropout_rate={rate!r} must be a number in [0, 1)")
    if rate > 0 and seed is None:
        raise ValueError(f"{where}: dropout_rate={rate} needs a dropout_seed (an int32 scalar)")
    if rate > 0 and not isinstance(seed, int):
        dtype, size = getattr(seed, "dtype", None), getattr(seed, "size", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.integer) or size != 1:
            raise ValueError(f"{where}: dropout_seed must be a Python int or an integer scalar "
                             f"array (int32/uint32), got {dtype=} with {size=}")
    return float(rate)
