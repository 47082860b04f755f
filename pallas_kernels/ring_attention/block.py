"""One step of the ring: local queries against one visiting key/value block.

The block worker is any attention that returns `(o, lse)` and masks from explicit
GLOBAL positions and segment ids (reference.mha_reference's semantics). Because the
mask is computed from the tokens' true positions, the same worker is exact for every
layout: a striped block and a contiguous block differ only in which positions they hold.

Workers (`impl`):
  "reference"   reference.mha_reference(..., return_lse=True), plain jnp.
  "pallas_gpu"  gpu.flash_attention_with_lse (Pallas Triton; interpret mode on CPU).
  "pallas_tpu"  tpu.flash_attention_with_lse (Pallas Mosaic TPU; interpret mode off TPU).
  "auto"        the GPU kernel on GPU, the TPU kernel on TPU, the reference elsewhere.

`block_is_live` decides, from the blocks' position and segment bounds alone, whether a
visiting block can hold any unmasked pair; the ring skips the others with `lax.cond`
(with a contiguous layout and a causal mask, every block from a later device).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention import reference

RING_IMPLS = ("auto", "reference", "pallas_gpu", "pallas_tpu")


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Static settings of the block worker (hashable: a nondiff argument of custom_vjp)."""

    impl: str
    causal: bool
    sliding_window: int | None = None
    logit_soft_cap: float | None = None
    sm_scale: float | None = None
    block_sizes: Any = None          # gpu.BlockSizes / tpu.BlockSizes for the kernels
    skip_masked_blocks: bool = True  # lax.cond around blocks with no unmasked pair


def resolve_impl(impl: str) -> str:
    """"auto" -> the kernel of the current platform; others are checked and kept."""
    if impl not in RING_IMPLS:
        raise ValueError(f"{impl=} must be one of {RING_IMPLS}")
    if impl != "auto":
        return impl
    platform = jax.default_backend()
    return {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "tpu": "pallas_tpu"}.get(platform, "reference")


def _kernel(impl: str):
    if impl == "pallas_gpu":
        from pallas_kernels.flash_attention import gpu
        return gpu.flash_attention_with_lse
    from pallas_kernels.flash_attention import tpu
    return tpu.flash_attention_with_lse


def block_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, cfg: BlockConfig):
    """Attention of q [B, Tq, H, D] on one block k, v [B, Tk, Hkv, D] -> (o [B, Tq, H, Dv], lse [B, H, Tq]).

    Rows with no unmasked key in this block get o = 0 and lse = -inf.
    """
    segment_ids = None if q_seg is None else (q_seg, kv_seg)
    kw = dict(causal=cfg.causal, sliding_window=cfg.sliding_window, segment_ids=segment_ids,
              q_positions=q_pos, kv_positions=kv_pos, logit_soft_cap=cfg.logit_soft_cap,
              sm_scale=cfg.sm_scale)
    impl = resolve_impl(cfg.impl)
    if impl == "reference":
        return reference.mha_reference(q, k, v, return_lse=True, **kw)
    return _kernel(impl)(q, k, v, block_sizes=cfg.block_sizes, **kw)


def block_is_live(q_pos, kv_pos, q_seg, kv_seg, cfg: BlockConfig):
    """False only if no (query, key) pair of the two blocks can be unmasked (scalar bool).

    Conservative bounds per batch row: causal needs max(q_pos) >= min(kv_pos); a sliding
    window needs min(q_pos) - max(kv_pos) < W (and the mirror when not causal); segment
    ids need overlapping ranges of ids. A block that passes may still be empty; the
    worker then returns lse = -inf, which the merge ignores.
    """
    live = jnp.ones(q_pos.shape[:1], dtype=bool)  # [B]
    q_lo, q_hi = jnp.min(q_pos, axis=1), jnp.max(q_pos, axis=1)
    kv_lo, kv_hi = jnp.min(kv_pos, axis=1), jnp.max(kv_pos, axis=1)
    if cfg.causal:
        live &= q_hi >= kv_lo
    if cfg.sliding_window is not None:
        live &= q_lo - kv_hi < cfg.sliding_window
        if not cfg.causal:
            live &= kv_lo - q_hi < cfg.sliding_window
    if q_seg is not None:
        live &= (jnp.min(q_seg, axis=1) <= jnp.max(kv_seg, axis=1)) & (
            jnp.min(kv_seg, axis=1) <= jnp.max(q_seg, axis=1))
    return jnp.any(live)


def maybe_skip(live, compute, skipped, cfg: BlockConfig):
    """`compute()` if the block is live, else the zero result `skipped()` (no work)."""
    if not cfg.skip_masked_blocks:
        return compute()
    return jax.lax.cond(live, compute, skipped)


def empty_block(q, v):
    """What a block with no unmasked pair contributes: o = 0, lse = -inf."""
    b, tq, h, _ = q.shape
    return (jnp.zeros((b, tq, h, v.shape[3]), q.dtype),
            jnp.full((b, h, tq), -jnp.inf, jnp.float32))


@functools.partial(jax.named_call, name="ring_block_vjp")
def block_attention_vjp(q, k, v, q_pos, kv_pos, q_seg, kv_seg, cfg: BlockConfig):
    """(o, lse) of the block and the pullback of (do, dlse) to (dq, dk, dv): recomputes the block."""
    def f(q, k, v):
        return block_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, cfg)
    return jax.vjp(f, q, k, v)
