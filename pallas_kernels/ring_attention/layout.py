"""Sequence layouts for ring attention: which tokens each device of the ring holds.

A sequence of T tokens is split over the N devices of the ring axis in one of two ways:

  contiguous   device d holds tokens [d*T/N, (d+1)*T/N) — Ring Attention (Liu et al. 2023,
               https://arxiv.org/abs/2310.01889). With a causal mask device 0 has one
               block of work and device N-1 has N: the ring waits for the slowest.
  striped      device d holds tokens t with (t // stripe) % N == d — Striped Attention
               (Brandon et al. 2023, https://arxiv.org/abs/2311.09431). Every device sees
               every part of the sequence, so causal work is the same on all of them.
               `stripe=1` (token granularity, the paper's choice) balances best.

A layout is a permutation of the sequence axis: `to_layout` puts the tokens in the
order in which contiguous sharding over the ring hands each device its share, and
`from_layout` undoes it. Positions travel with the tokens (`layout_positions`), so a
model running in the layout sees the true position of every token.

    >>> import numpy as np
    >>> x = np.arange(8)[None]                           # [B=1, T=8] natural order
    >>> to_layout(x, 2, "striped")                       # device 0: 0 2 4 6 | device 1: 1 3 5 7
    array([[0, 2, 4, 6, 1, 3, 5, 7]])
    >>> from_layout(to_layout(x, 2, "striped"), 2, "striped")
    array([[0, 1, 2, 3, 4, 5, 6, 7]])
"""
from __future__ import annotations

import numpy as np

LAYOUTS = ("striped", "contiguous")


def check_layout(layout: str, seq_len: int | None = None, n: int = 1, stripe: int = 1) -> None:
    """ValueError naming the argument for an unknown layout or a length the ring cannot split."""
    if layout not in LAYOUTS:
        raise ValueError(f"{layout=} must be one of {LAYOUTS}")
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"ring size {n=} must be a positive int")
    if not isinstance(stripe, (int, np.integer)) or stripe < 1:
        raise ValueError(f"{stripe=} must be a positive int")
    if seq_len is None:
        return
    unit = n * stripe if layout == "striped" else n
    if seq_len % unit:
        what = f"ring size {n} x {stripe=}" if layout == "striped" else f"ring size {n}"
        raise ValueError(f"sequence length {seq_len} must be divisible by the {what} "
                         f"for {layout=}")


def _split(x, axis: int, shape):
    """Replace dim `axis` of `x` by the dims `shape` (works on numpy and jax arrays)."""
    axis = axis % x.ndim
    return x.reshape(x.shape[:axis] + tuple(shape) + x.shape[axis + 1:])


def _merge(x, axis: int, count: int):
    """Merge `count` dims of `x` starting at `axis` into one."""
    axis = axis % x.ndim
    return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + count:])


def to_layout(x, n: int, layout: str, axis: int = 1, stripe: int = 1):
    """Natural token order -> layout order along `axis` (a no-op for "contiguous").

    Args:
      x: numpy or jax array with the sequence on `axis` (e.g. [B, T] tokens, [B, T, H, D]).
      n: ring size (devices on the sequence axis).
      layout: "striped" or "contiguous".
      axis: the sequence axis.
      stripe: tokens per stripe for "striped" (1 = token granularity).
    """
    axis = axis % x.ndim
    check_layout(layout, x.shape[axis], n, stripe)
    if layout == "contiguous" or n == 1:
        return x
    t = x.shape[axis]
    x = _split(x, axis, (t // (n * stripe), n, stripe))  # [..., rounds, device, stripe, ...]
    x = x.swapaxes(axis, axis + 1)                        # [..., device, rounds, stripe, ...]
    return _merge(x, axis, 3)


def from_layout(x, n: int, layout: str, axis: int = 1, stripe: int = 1):
    """Layout order -> natural token order along `axis`; inverse of `to_layout`."""
    axis = axis % x.ndim
    check_layout(layout, x.shape[axis], n, stripe)
    if layout == "contiguous" or n == 1:
        return x
    t = x.shape[axis]
    x = _split(x, axis, (n, t // (n * stripe), stripe))  # [..., device, rounds, stripe, ...]
    x = x.swapaxes(axis, axis + 1)                        # [..., rounds, device, stripe, ...]
    return _merge(x, axis, 3)


def layout_positions(seq_len: int, n: int, layout: str, stripe: int = 1,
                     batch: int | None = None) -> np.ndarray:
    """The natural position of each slot of the layout: int32 [T], or [batch, T] if given.

    Slice i of N equal slices is device i's share; e.g. striped, T=8, N=2:
    [0 2 4 6 | 1 3 5 7].
    """
    pos = to_layout(np.arange(seq_len, dtype=np.int32)[None], n, layout, stripe=stripe)[0]
    return pos if batch is None else np.broadcast_to(pos, (batch, seq_len))
