"""Flash attention for NVIDIA GPUs in Pallas (Triton lowering): forward and backward.

FlashAttention-2 (Dao, 2023, https://arxiv.org/abs/2307.08691): the forward streams
key/value blocks past a resident query block with an online softmax in f32 and saves
the log-sum-exp; the backward recomputes the probabilities from it in two kernels, one
for dq (a program per query block) and one for dk/dv (a program per key block, which
also loops over the query heads that share the kv head, so GQA needs no K/V repeat and
no reduction afterwards). Every mask of reference.py is supported — causal, sliding
window, segment ids, explicit positions — plus soft-capping, attention sinks and attention
dropout; tiles the mask hides entirely are never visited (gpu_tiling.py).

Dropout (`dropout_rate > 0`, FlashAttention-2 with dropout): every tile regenerates its
keep mask from (seed, batch, query head, query row, key row) with dropout.keep_mask, in
the forward and again in the backward, so the mask is never stored. The forward scales
the kept probabilities by 1 / (1 - rate) in P @ V only (the log-sum-exp is the undropped
softmax's); the backward applies the mask to dV = Pdᵀ dO and dP = dO Vᵀ, and
ds = p * (dp - delta) holds unchanged because o already carries the dropout.

On a Hopper GPU (H100/H200, compiled) the common training calls — full or causal, with or
without segment ids (packed documents), bf16/f16, head dims 64/128 (256 forward only), no
padding, no dropout — go instead to the warp-specialised Mosaic GPU kernels of gpu_hopper.py
(forward) and gpu_hopper_bwd.py (backward), about 1.3x faster than these Triton kernels
there; `BlockSizes.forward` / `.backward` choose.

    import jax, jax.numpy as jnp
    from pallas_kernels.flash_attention import gpu
    q = jax.random.normal(jax.random.key(0), (1, 100, 4, 64), jnp.bfloat16)
    k = v = jax.random.normal(jax.random.key(1), (1, 100, 2, 64), jnp.bfloat16)
    o, lse = gpu.flash_attention_with_lse(q, k, v, causal=True)   # interpret mode on CPU

Layout BTHD as everywhere in the project. Inside, sequences are padded to whole blocks
(padded keys are masked, padded query rows are dropped) and head dims to a power of two
>= 16 (zeros: they change no logit), because Triton tiles are powers of two.
Logits are kept in base 2 (`exp2`, with log2(e) folded into the scale); the returned
log-sum-exp is in natural units, like `reference.mha_reference(..., return_lse=True)`.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash_attention import api, dropout, gpu_hopper, gpu_hopper_bwd, reference
from pallas_kernels.flash_attention.gpu_tiling import block_spans

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
BACKWARDS = ("auto", "split", "fused", "hopper")
FORWARDS = ("auto", "triton", "hopper")
_BLOCK_FIELDS = ("block_q", "block_k", "block_q_dkv", "block_kv_dkv", "block_q_dq", "block_kv_dq")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and Triton launch parameters of the three kernels.

    Attributes:
      block_q, block_k: query rows / key rows per tile in the forward kernel.
      block_q_dkv, block_kv_dkv: tiles of the dk/dv kernel (a program per key block).
      block_q_dq, block_kv_dq: tiles of the dq kernel (a program per query block).
      num_warps, num_stages: forward launch; num_warps_bwd, num_stages_bwd: backward.
      backward: "split" (Triton: a dq kernel and a dk/dv kernel, 7 matmuls per tile
        pair, deterministic), "fused" (Triton: the dk/dv kernel also adds each tile's dq
        into an f32 buffer with atomic adds, as FlashAttention-2 does: 5 matmuls, no
        second pass, summation order not fixed), "hopper" (gpu_hopper_bwd.py's split
        backward in Mosaic GPU, or a ValueError saying why not) or "auto" ("hopper"
        where it runs, as `forward` decides, else "split").
      forward: "auto" (the warp-specialised Mosaic GPU kernel of gpu_hopper.py when the
        code runs compiled on a Hopper GPU and the call is one it covers, else Triton),
        "triton" (always this file's kernel) or "hopper" (gpu_hopper.py or a ValueError
        saying why not).
    All blocks are powers of two >= 16 (Triton's dot needs that); blocks longer than
    the sequence shrink to it, and sequences are padded to whole blocks.
    """

    block_q: int = 128
    block_k: int = 128
    block_q_dkv: int = 64
    block_kv_dkv: int = 128
    block_q_dq: int = 128
    block_kv_dq: int = 64
    num_warps: int = 8
    num_stages: int = 3
    num_warps_bwd: int = 8
    num_stages_bwd: int = 3
    backward: str = "auto"
    forward: str = "auto"

    def __post_init__(self):
        if self.backward not in BACKWARDS:
            raise ValueError(f"BlockSizes.backward={self.backward!r} must be one of {BACKWARDS}")
        if self.forward not in FORWARDS:
            raise ValueError(f"BlockSizes.forward={self.forward!r} must be one of {FORWARDS}")
        for name in _BLOCK_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ValueError(f"BlockSizes.{name}={value!r} must be a power of two >= 16")
        for name in ("num_warps", "num_warps_bwd"):
            value = getattr(self, name)
            if value not in (1, 2, 4, 8, 16):
                raise ValueError(f"BlockSizes.{name}={value!r} must be one of 1, 2, 4, 8, 16")
        for name in ("num_stages", "num_stages_bwd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BlockSizes.{name}={value!r} must be a positive int")

    @classmethod
    def get_default(cls, head_dim: int, device_kind: str | None = None, *,
                    v_head_dim: int | None = None) -> "BlockSizes":
        """Defaults tuned on an H100/H200 (bench/flash_attention.py); other GPUs get the same.

        v_head_dim: the values' head dim when it differs (MLA: 192 for q/k, 128 for v).
        """
        del device_kind  # one table for now: only Hopper was measured
        if head_dim <= 64:
            return cls(block_q=128, block_k=128, num_warps=4, num_stages=3,
                       block_q_dkv=64, block_kv_dkv=128, block_q_dq=128, block_kv_dq=64,
                       num_warps_bwd=8, num_stages_bwd=3)
        if head_dim <= 128:
            return cls()
        if (v_head_dim or head_dim) <= 128:
            # MLA (q/k 192, padded to 256; v 128): 128-row key tiles in the dk/dv kernel and
            # 128-row query tiles in the dq kernel fit shared memory beside v's 128 columns.
            # H200, B=4 S=4k H=16 causal: fwd+bwd 4.78 ms against 6.82 with the tiles below
            # (which equal-width 256 heads need: these overflow shared memory there).
            return cls(block_q=128, block_k=64, num_warps=8, num_stages=2,
                       block_q_dkv=64, block_kv_dkv=128, block_q_dq=128, block_kv_dq=64,
                       num_warps_bwd=8, num_stages_bwd=2)
        return cls(block_q=128, block_k=64, num_warps=8, num_stages=2,
                   block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64,
                   num_warps_bwd=8, num_stages_bwd=2)

    def fit(self, q_len: int, kv_len: int) -> "BlockSizes":
        """Shrink blocks longer than the (power-of-two rounded) sequence."""
        def cap(block, length):
            return max(16, min(block, _next_pow2(length)))
        return dataclasses.replace(
            self,
            block_q=cap(self.block_q, q_len), block_k=cap(self.block_k, kv_len),
            block_q_dkv=cap(self.block_q_dkv, q_len), block_kv_dkv=cap(self.block_kv_dkv, kv_len),
            block_q_dq=cap(self.block_q_dq, q_len), block_kv_dq=cap(self.block_kv_dq, kv_len))


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static (hashable) description of one call, after padding."""

    causal: bool
    sliding_window: int | None
    logit_soft_cap: float | None
    sm_scale: float
    has_segments: bool
    has_sinks: bool
    kv_len: int  # real (unpadded) number of keys
    masked: bool  # whether any tile can need the element-wise mask
    blocks: BlockSizes
    interpret: bool
    hopper: gpu_hopper.HopperBlocks | None = None  # forward by gpu_hopper.py when set
    hopper_bwd: gpu_hopper_bwd.HopperBackwardBlocks | None = None  # backward by gpu_hopper_bwd
    dropout_rate: float = 0.0  # attention dropout; > 0 adds the seed input to every kernel


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# ----------------------------------------------------------------------------- tile math
def _scores(a, b, cfg: _Config):
    """Logits a @ b.T in base-2 units, f32; also tanh(.) for the soft-cap derivative."""
    s = plgpu.dot(a, b, trans_b=True)
    if cfg.logit_soft_cap is None:
        return s * (cfg.sm_scale * LOG2E), None
    t = jnp.tanh(s * (cfg.sm_scale / cfg.logit_soft_cap))
    return t * (cfg.logit_soft_cap * LOG2E), t


def _keep(q_pos, kv_pos, q_seg, kv_seg, kv_idx, cfg: _Config):
    """reference.attention_mask on one tile; arguments broadcast to the tile's shape."""
    keep = kv_idx < cfg.kv_len
    diff = q_pos - kv_pos
    if cfg.causal:
        keep &= diff >= 0
    if cfg.sliding_window is not None:
        keep &= diff < cfg.sliding_window
        if not cfg.causal:
            keep &= -diff < cfg.sliding_window
    if cfg.has_segments:
        keep &= q_seg == kv_seg
    return keep


def _dropout_keep(seed_ref, batch, head, q_idx, kv_idx, cfg: _Config):
    """dropout.keep_mask on one tile: True where p[batch, head, q_idx, kv_idx] is kept."""
    return dropout.keep_mask(seed_ref[0], batch, head, q_idx, kv_idx, rate=cfg.dropout_rate)


def _dropped(keep, x, cfg: _Config):
    """x * keep / (1 - rate): a kept entry scaled up, a dropped one 0."""
    return jnp.where(keep, x * (1.0 / (1.0 - cfg.dropout_rate)), 0.0)


def _visit(spans_ref, num_blocks, body, carry, cfg: _Config):
    """Run body(j, carry, masked) over the needed blocks: masked, unmasked, masked."""
    if not cfg.masked:
        return jax.lax.fori_loop(0, num_blocks, functools.partial(body, masked=False), carry)
    lo, full_lo, full_hi, hi = spans_ref[0], spans_ref[1], spans_ref[2], spans_ref[3]
    carry = jax.lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), carry)
    carry = jax.lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
    return jax.lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)


def _unpack(refs, cfg: _Config, names):
    """Name the positional refs; segment refs, sinks and seed are present only when used."""
    refs = list(refs)
    out = {}
    for name in names:
        if name in ("q_seg", "kv_seg") and not cfg.has_segments:
            out[name] = None
        elif name == "sinks" and not cfg.has_sinks:
            out[name] = None
        elif name == "seed" and not cfg.dropout_rate:
            out[name] = None
        else:
            out[name] = refs.pop(0)
    assert not refs, f"{len(refs)} unnamed refs"
    return out


# ----------------------------------------------------------------------------- forward
_FWD_INPUTS = ("spans", "q_pos", "kv_pos", "q_seg", "kv_seg", "q", "k", "v", "sinks", "seed",
               "o", "lse")


def _fwd_kernel(*refs, cfg: _Config):
    r = _unpack(refs, cfg, _FWD_INPUTS)
    bq, bk = cfg.blocks.block_q, cfg.blocks.block_k
    q = r["q"][...]  # [bq, D]
    q_pos = r["q_pos"][...][:, None]  # [bq, 1]
    q_seg = r["q_seg"][...][:, None] if cfg.has_segments else None
    # Dropout indices; program ids are read here, outside the loops (interpret mode needs it).
    q_idx = (pl.program_id(0) * bq + jnp.arange(bq, dtype=jnp.int32))[:, None]  # [bq, 1]
    batch, head = pl.program_id(1), pl.program_id(2)
    dv = r["v"].shape[-1]

    def body(j, carry, masked):
        acc, m, l = carry  # [bq, Dv], [bq], [bq]
        ks = pl.ds(j * bk, bk)
        k = r["k"][ks, :]  # [bk, D]
        v = r["v"][ks, :]  # [bk, Dv]
        s, _ = _scores(q, k, cfg)  # [bq, bk], base 2
        kv_idx = (j * bk + jnp.arange(bk, dtype=jnp.int32))[None, :]  # [1, bk]
        if masked:
            kv_seg = r["kv_seg"][ks][None, :] if cfg.has_segments else None
            keep = _keep(q_pos, r["kv_pos"][ks][None, :], q_seg, kv_seg, kv_idx, cfg)
            s = jnp.where(keep, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # A row with nothing kept so far keeps m = -inf; subtract 0 there, not -inf.
        m_sub = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
        alpha = jnp.exp2(m - m_sub)
        p = jnp.exp2(s - m_sub[:, None])
        l = l * alpha + jnp.sum(p, axis=1)  # the denominator sums the undropped p
        if cfg.dropout_rate:
            p = _dropped(_dropout_keep(r["seed"], batch, head, q_idx, kv_idx, cfg), p, cfg)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v)
        return acc, m_new, l

    carry = (jnp.zeros((bq, dv), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
             jnp.zeros((bq,), jnp.float32))
    acc, m, l = _visit(r["spans"], r["k"].shape[0] // bk, body, carry, cfg)
    if cfg.has_sinks:  # the sink adds exp(sink) to the denominator only
        sink = r["sinks"][0] * LOG2E
        m_new = jnp.maximum(m, sink)
        alpha = jnp.exp2(m - m_new)
        l = l * alpha + jnp.exp2(sink - m_new)
        acc = acc * alpha[:, None]
        m = m_new
    empty = l == 0.0  # fully masked rows: output 0, log-sum-exp -inf
    l_safe = jnp.where(empty, 1.0, l)
    r["o"][...] = (acc / l_safe[:, None]).astype(r["o"].dtype)
    r["lse"][...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) * LN2)


_SEED_SPEC = pl.BlockSpec((1,), lambda *_: (0,))  # the dropout seed, [1] int32, in every program


def _fwd_call(q, k, v, q_pos, kv_pos, q_seg, kv_seg, sinks, seed, spans, cfg: _Config):
    b, tq, h, d = q.shape
    tk, hkv, dv = v.shape[1:]
    group = h // hkv
    bq, bk = cfg.blocks.block_q, cfg.blocks.block_k
    in_specs = [
        pl.BlockSpec((None, None, 4), lambda i, bb, hh: (bb, i, 0)),  # spans
        pl.BlockSpec((None, bq), lambda i, bb, hh: (bb, i)),  # q_pos
        pl.BlockSpec((None, tk), lambda i, bb, hh: (bb, 0)),  # kv_pos
    ]
    args = [spans, q_pos, kv_pos]
    if cfg.has_segments:
        in_specs += [pl.BlockSpec((None, bq), lambda i, bb, hh: (bb, i)),
                     pl.BlockSpec((None, tk), lambda i, bb, hh: (bb, 0))]
        args += [q_seg, kv_seg]
    in_specs += [
        pl.BlockSpec((None, bq, None, d), lambda i, bb, hh: (bb, i, hh, 0)),
        # GQA: query head hh reads kv head hh // group straight from memory.
        pl.BlockSpec((None, tk, None, d), lambda i, bb, hh: (bb, 0, hh // group, 0)),
        pl.BlockSpec((None, tk, None, dv), lambda i, bb, hh: (bb, 0, hh // group, 0)),
    ]
    args += [q, k, v]
    if cfg.has_sinks:
        in_specs.append(pl.BlockSpec((1,), lambda i, bb, hh: (hh,)))
        args.append(sinks)
    if cfg.dropout_rate:
        in_specs.append(_SEED_SPEC)
        args.append(seed)
    name = f"flash_fwd_bq{bq}_bk{bk}"
    with jax.named_scope(name):
        return pl.pallas_call(
            functools.partial(_fwd_kernel, cfg=cfg),
            grid=(tq // bq, b, h),
            in_specs=in_specs,
            out_specs=[pl.BlockSpec((None, bq, None, dv), lambda i, bb, hh: (bb, i, hh, 0)),
                       pl.BlockSpec((None, None, bq), lambda i, bb, hh: (bb, hh, i))],
            out_shape=[jax.ShapeDtypeStruct((b, tq, h, dv), q.dtype),
                       jax.ShapeDtypeStruct((b, h, tq), jnp.float32)],
            compiler_params=plgpu.CompilerParams(num_warps=cfg.blocks.num_warps,
                                                 num_stages=cfg.blocks.num_stages),
            interpret=cfg.interpret,
            name=name,
        )(*args)


# ----------------------------------------------------------------------------- backward
_DQ_INPUTS = ("spans", "q_pos", "kv_pos", "q_seg", "kv_seg", "q", "k", "v", "do", "lse",
              "delta", "seed", "dq")


def _dq_kernel(*refs, cfg: _Config):
    """dq = scale * sum_j ds_j k_j with ds = p * (dp - delta), p = exp2(s - lse).

    With dropout dp = (do v^T) * keep / (1 - rate).
    """
    r = _unpack(refs, cfg, _DQ_INPUTS)
    bq, bk = cfg.blocks.block_q_dq, cfg.blocks.block_kv_dq
    q = r["q"][...]  # [bq, D]
    do = r["do"][...]  # [bq, Dv]
    lse = r["lse"][...][:, None]  # [bq, 1], base 2; +inf on empty rows makes p = 0
    delta = r["delta"][...][:, None]  # [bq, 1]
    q_pos = r["q_pos"][...][:, None]
    q_seg = r["q_seg"][...][:, None] if cfg.has_segments else None
    # Dropout indices; program ids are read here, outside the loops (interpret mode needs it).
    q_idx = (pl.program_id(0) * bq + jnp.arange(bq, dtype=jnp.int32))[:, None]  # [bq, 1]
    batch, head = pl.program_id(1), pl.program_id(2)

    def body(j, dq, masked):
        ks = pl.ds(j * bk, bk)
        k = r["k"][ks, :]
        v = r["v"][ks, :]
        s, t = _scores(q, k, cfg)  # [bq, bk]
        kv_idx = (j * bk + jnp.arange(bk, dtype=jnp.int32))[None, :]  # [1, bk]
        if masked:
            kv_seg = r["kv_seg"][ks][None, :] if cfg.has_segments else None
            keep = _keep(q_pos, r["kv_pos"][ks][None, :], q_seg, kv_seg, kv_idx, cfg)
            s = jnp.where(keep, s, -jnp.inf)
        p = jnp.exp2(s - lse)
        dp = plgpu.dot(do, v, trans_b=True)  # [bq, bk]
        if cfg.dropout_rate:
            dp = _dropped(_dropout_keep(r["seed"], batch, head, q_idx, kv_idx, cfg), dp, cfg)
        ds = p * (dp - delta)
        if t is not None:  # d/dx cap * tanh(x / cap) = 1 - tanh^2
            ds = ds * (1.0 - t * t)
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    dq = _visit(r["spans"], r["k"].shape[0] // bk, body,
                jnp.zeros(q.shape, jnp.float32), cfg)
    r["dq"][...] = (dq * cfg.sm_scale).astype(r["dq"].dtype)


_DKV_INPUTS = ("spans", "q_pos", "kv_pos", "q_seg", "kv_seg", "q", "k", "v", "do", "lse",
               "delta", "seed", "dk", "dv")
# Fused backward: the zeroed f32 dq buffer comes in aliased to the dq output.
_FUSED_INPUTS = _DKV_INPUTS[:-2] + ("dq_zeros", "dk", "dv", "dq")


def _dkv_kernel(*refs, cfg: _Config):
    """dv = sum_i p_i^T do_i and dk = scale * sum_i ds_i^T q_i over queries and GQA heads.

    With dropout p_i^T in dv and dp_i^T are masked and scaled by 1 / (1 - rate).

    Works in the transposed frame (key rows, query columns) so every dot has its
    left operand untransposed, as in the Triton fused-attention tutorial.
    """
    fused = cfg.blocks.backward == "fused"
    r = _unpack(refs, cfg, _FUSED_INPUTS if fused else _DKV_INPUTS)
    bq, bk = cfg.blocks.block_q_dkv, cfg.blocks.block_kv_dkv
    group = r["q"].shape[1]
    k = r["k"][...]  # [bk, D]
    v = r["v"][...]  # [bk, Dv]
    kv_pos = r["kv_pos"][...][:, None]  # [bk, 1]
    kv_seg = r["kv_seg"][...][:, None] if cfg.has_segments else None
    kv_idx = (pl.program_id(0) * bk + jnp.arange(bk, dtype=jnp.int32))[:, None]
    batch, kv_head = pl.program_id(1), pl.program_id(2)  # dropout: query head kv_head * group + g

    def body(i, carry, g, masked):
        dk, dv = carry
        qs = pl.ds(i * bq, bq)
        q = r["q"][qs, g, :]  # [bq, D]
        do = r["do"][qs, g, :]  # [bq, Dv]
        s_t, t_t = _scores(k, q, cfg)  # [bk, bq]
        if masked:
            q_seg = r["q_seg"][qs][None, :] if cfg.has_segments else None
            keep = _keep(r["q_pos"][qs][None, :], kv_pos, q_seg, kv_seg, kv_idx, cfg)
            s_t = jnp.where(keep, s_t, -jnp.inf)
        p_t = jnp.exp2(s_t - r["lse"][g, qs][None, :])
        dp_t = plgpu.dot(v, do, trans_b=True)  # [bk, bq]
        if cfg.dropout_rate:
            q_idx = (i * bq + jnp.arange(bq, dtype=jnp.int32))[None, :]  # [1, bq]
            drop = _dropout_keep(r["seed"], batch, kv_head * group + g, q_idx, kv_idx,
                                 cfg)  # [bk, bq]
            dv = dv + plgpu.dot(_dropped(drop, p_t, cfg).astype(do.dtype), do)
            dp_t = _dropped(drop, dp_t, cfg)
        else:
            dv = dv + plgpu.dot(p_t.astype(do.dtype), do)
        ds_t = p_t * (dp_t - r["delta"][g, qs][None, :])
        if t_t is not None:
            ds_t = ds_t * (1.0 - t_t * t_t)
        ds_t = ds_t.astype(q.dtype)
        if fused:  # this key block's share of dq: ds @ k, added to the f32 buffer
            dq = plgpu.dot(ds_t, k, trans_a=True) * cfg.sm_scale  # [bq, D]
            plgpu.atomic_add(r["dq"], (qs, g, slice(None)), dq)
        return dk + plgpu.dot(ds_t, q), dv

    def per_head(g, carry):
        return _visit(r["spans"], r["q"].shape[0] // bq,
                      lambda i, c, masked: body(i, c, g, masked), carry, cfg)

    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = jax.lax.fori_loop(0, group, per_head, carry)
    r["dk"][...] = (dk * cfg.sm_scale).astype(r["dk"].dtype)
    r["dv"][...] = dv.astype(r["dv"].dtype)


def _mask_specs(cfg: _Config, tq: int, tk: int, q_block: int | None, kv_block: int | None):
    """BlockSpecs of spans, positions and segment ids; a None block means the whole axis."""
    q_spec = (pl.BlockSpec((None, q_block), lambda i, bb, hh: (bb, i)) if q_block
              else pl.BlockSpec((None, tq), lambda i, bb, hh: (bb, 0)))
    kv_spec = (pl.BlockSpec((None, kv_block), lambda i, bb, hh: (bb, i)) if kv_block
               else pl.BlockSpec((None, tk), lambda i, bb, hh: (bb, 0)))
    specs = [pl.BlockSpec((None, None, 4), lambda i, bb, hh: (bb, i, 0)), q_spec, kv_spec]
    if cfg.has_segments:
        specs += [q_spec, kv_spec]
    return specs


def _bwd_call(q, k, v, q_pos, kv_pos, q_seg, kv_seg, do, lse2, delta, seed, spans_dq, spans_dkv,
              cfg: _Config):
    """dq, dk, dv from the saved log-sum-exp (base 2, +inf on empty rows) and delta."""
    b, tq, h, d = q.shape
    tk, hkv, dv = v.shape[1:]
    group = h // hkv
    blocks = cfg.blocks
    segs = [q_seg, kv_seg] if cfg.has_segments else []
    seeds, seed_specs = ([seed], [_SEED_SPEC]) if cfg.dropout_rate else ([], [])
    params = plgpu.CompilerParams(num_warps=blocks.num_warps_bwd,
                                  num_stages=blocks.num_stages_bwd)

    fused = blocks.backward == "fused"
    bq, bk = blocks.block_q_dq, blocks.block_kv_dq
    name = f"flash_bwd_dq_bq{bq}_bk{bk}"
    with jax.named_scope(name):
        dq = None if fused else pl.pallas_call(
            functools.partial(_dq_kernel, cfg=cfg),
            grid=(tq // bq, b, h),
            in_specs=_mask_specs(cfg, tq, tk, bq, None) + [
                pl.BlockSpec((None, bq, None, d), lambda i, bb, hh: (bb, i, hh, 0)),
                pl.BlockSpec((None, tk, None, d), lambda i, bb, hh: (bb, 0, hh // group, 0)),
                pl.BlockSpec((None, tk, None, dv), lambda i, bb, hh: (bb, 0, hh // group, 0)),
                pl.BlockSpec((None, bq, None, dv), lambda i, bb, hh: (bb, i, hh, 0)),
                pl.BlockSpec((None, None, bq), lambda i, bb, hh: (bb, hh, i)),
                pl.BlockSpec((None, None, bq), lambda i, bb, hh: (bb, hh, i)),
            ] + seed_specs,
            out_specs=pl.BlockSpec((None, bq, None, d), lambda i, bb, hh: (bb, i, hh, 0)),
            out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
            compiler_params=params,
            interpret=cfg.interpret,
            name=name,
        )(spans_dq, q_pos, kv_pos, *segs, q, k, v, do, lse2, delta, *seeds)

    bq, bk = blocks.block_q_dkv, blocks.block_kv_dkv
    name = f"flash_bwd_{'fused' if fused else 'dkv'}_bq{bq}_bk{bk}"
    # One program per (key block, batch, kv head); it loops over the `group` query
    # heads of its kv head, so query-side blocks span all of them: [Tq, group, D].
    # Fused: every program of a (batch, kv head) adds into the same dq slab, which
    # the launch order (key blocks fastest) keeps hot in L2 while they run.
    args = [spans_dkv, q_pos, kv_pos, *segs, q, k, v, do, lse2, delta, *seeds]
    dq_spec = pl.BlockSpec((None, tq, group, d), lambda j, bb, hh: (bb, 0, hh, 0))
    extra_specs, extra_out, extra_shape, aliases = [], [], [], {}
    if fused:  # a zeroed f32 buffer, aliased to the third output (dq)
        args.append(jnp.zeros(q.shape, jnp.float32))
        extra_specs, extra_out = [dq_spec], [dq_spec]
        extra_shape, aliases = [jax.ShapeDtypeStruct(q.shape, jnp.float32)], {len(args) - 1: 2}
    with jax.named_scope(name):
        outs = pl.pallas_call(
            functools.partial(_dkv_kernel, cfg=cfg),
            grid=(tk // bk, b, hkv),
            in_specs=_mask_specs(cfg, tq, tk, None, bk) + [
                pl.BlockSpec((None, tq, group, d), lambda j, bb, hh: (bb, 0, hh, 0)),
                pl.BlockSpec((None, bk, None, d), lambda j, bb, hh: (bb, j, hh, 0)),
                pl.BlockSpec((None, bk, None, dv), lambda j, bb, hh: (bb, j, hh, 0)),
                pl.BlockSpec((None, tq, group, dv), lambda j, bb, hh: (bb, 0, hh, 0)),
                pl.BlockSpec((None, group, tq), lambda j, bb, hh: (bb, hh, 0)),
                pl.BlockSpec((None, group, tq), lambda j, bb, hh: (bb, hh, 0)),
            ] + seed_specs + extra_specs,
            out_specs=[pl.BlockSpec((None, bk, None, d), lambda j, bb, hh: (bb, j, hh, 0)),
                       pl.BlockSpec((None, bk, None, dv), lambda j, bb, hh: (bb, j, hh, 0))]
            + extra_out,
            out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                       jax.ShapeDtypeStruct(v.shape, v.dtype)] + extra_shape,
            input_output_aliases=aliases,
            compiler_params=params,
            interpret=cfg.interpret,
            name=name,
        )(*args)
    dk, dv_ = outs[:2]
    if fused:
        dq = outs[2].astype(q.dtype)
    return dq, dk, dv_


# ----------------------------------------------------------------------------- custom_vjp
@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, sinks, masks, cfg: _Config):
    """(o, lse) on padded arrays; `masks` holds the int32 positions, segments, spans and the
    dropout seed ([1] int32, None without dropout): integers, so no cotangent."""
    return _flash_fwd(q, k, v, sinks, masks, cfg)[0]


def _flash_fwd(q, k, v, sinks, masks, cfg: _Config):
    q_pos, kv_pos, q_seg, kv_seg, spans_fwd, _, _, seed = masks
    if cfg.hopper is not None:
        o, lse = gpu_hopper.forward(q, k, v, causal=cfg.causal, sm_scale=cfg.sm_scale,
                                    blocks=cfg.hopper, segment_ids=_hopper_segments(cfg, masks))
    else:
        o, lse = _fwd_call(q, k, v, q_pos, kv_pos, q_seg, kv_seg, sinks, seed, spans_fwd, cfg)
    return (o, lse), (q, k, v, sinks, masks, o, lse)


# A jit of its own, so each layer's backward reuses one traced jaxpr: traced anew per call,
# the kernels' MLIR carries each call's full traceback in its locations, which makes every
# layer's kernel a distinct module that XLA compiles again (GPT-2 1.3B's 24 layers with
# segment ids did not finish compiling in 230 s on an H200). The forward's trace is
# cached by custom_vjp already.
@functools.partial(jax.jit, static_argnums=0)
def _flash_bwd(cfg: _Config, res, cotangents):
    q, k, v, sinks, masks, o, lse = res
    do, dlse = cotangents
    q_pos, kv_pos, q_seg, kv_seg, _, spans_dq, spans_dkv, seed = masks
    # delta_i = rowsum(o_i * do_i) - dlse_i: the softmax backward ds = p * (dp - delta)
    # then also carries the log-sum-exp cotangent (d lse_i / d s_ij = p_ij). With dropout
    # rowsum(o * do) is still rowsum(p * dp), dp the masked and scaled do v^T: o holds the mask.
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    delta = delta - dlse
    if cfg.hopper_bwd is not None:
        dq, dk, dv = gpu_hopper_bwd.backward(q, k, v, do, lse, delta, causal=cfg.causal,
                                             sm_scale=cfg.sm_scale, blocks=cfg.hopper_bwd,
                                             segment_ids=_hopper_segments(cfg, masks))
        return dq, dk, dv, None, None
    lse2 = jnp.where(jnp.isfinite(lse), lse * LOG2E, jnp.inf)  # empty rows: p = 0
    dq, dk, dv = _bwd_call(q, k, v, q_pos, kv_pos, q_seg, kv_seg, do.astype(q.dtype), lse2,
                           delta, seed, spans_dq, spans_dkv, cfg)
    dsinks = None
    if sinks is not None:  # d/d sink = -sum_i p_sink,i * delta_i, p_sink = exp(sink - lse)
        p_sink = jnp.exp(sinks[None, :, None] - lse)  # [B, H, Tq]
        dsinks = -jnp.sum(p_sink * delta, axis=(0, 2)).astype(sinks.dtype)
    return dq, dk, dv, dsinks, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _hopper_segments(cfg: _Config, masks):
    """The (q_seg, kv_seg) pair for the Hopper kernels, or None (their static switch).

    They run only on unpadded calls, so the padded ids of `masks` are the caller's.
    """
    return (masks[2], masks[3]) if cfg.has_segments else None


# ----------------------------------------------------------------------------- public API
def flash_attention_with_lse(
    q,
    k,
    v,
    *,
    causal: bool = False,
    sliding_window: int | None = None,
    segment_ids=None,
    q_positions=None,
    kv_positions=None,
    logit_soft_cap: float | None = None,
    sm_scale: float | None = None,
    sinks=None,
    dropout_rate: float = 0.0,
    dropout_seed=None,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
):
    """Attention output [B, Tq, H, Dv] and log-sum-exp [B, H, Tq] (natural log).

    Differentiable in both outputs (ring attention merges blocks by their lse).
    Mask and dropout semantics are reference.mha_reference's (the lse is the undropped
    softmax's). `interpret=None` picks Pallas interpret mode on a CPU backend, so the
    kernel runs anywhere.
    """
    api.validate_inputs(q, k, v, segment_ids, q_positions, kv_positions, sliding_window, sinks,
                  "pallas_gpu")
    dropout_rate = dropout.check_dropout(dropout_rate, dropout_seed,
                                         where="gpu.flash_attention_with_lse")
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes must be a gpu.BlockSizes or None, got {block_sizes!r}")
    if logit_soft_cap is not None and logit_soft_cap <= 0:
        raise ValueError(f"{logit_soft_cap=} must be positive or None")
    b, tq, h, d = q.shape
    tk, dv = k.shape[1], v.shape[3]
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if sm_scale is None:
        sm_scale = d**-0.5
    if block_sizes is None:
        block_sizes = BlockSizes.get_default(d, v_head_dim=dv)
    blocks = block_sizes.fit(tq, tk)
    # Pad sequences to whole blocks of every kernel (blocks are powers of two, so the
    # largest is a multiple of the others) and head dims to Triton-friendly powers of two.
    tq_pad = _round_up(tq, max(blocks.block_q, blocks.block_q_dq, blocks.block_q_dkv))
    tk_pad = _round_up(tk, max(blocks.block_k, blocks.block_kv_dq, blocks.block_kv_dkv))
    d_pad, dv_pad = _next_pow2(max(d, 16)), _next_pow2(max(dv, 16))

    q_positions_given = q_positions
    if q_positions is None:
        q_positions, kv_positions = reference.default_positions(b, tq, tk)
    q_seg, kv_seg = reference.split_segment_ids(segment_ids, tq, tk)
    has_segments = q_seg is not None

    def pad_seq(x, t_pad, mode):  # [B, T, ...] -> [B, t_pad, ...]
        widths = [(0, 0), (0, t_pad - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
        return jnp.pad(x, widths, mode=mode)

    def pad_heads(x, t_pad, d_to):  # [B, T, H, D] -> [B, t_pad, H, d_to], zeros
        return jnp.pad(x, [(0, 0), (0, t_pad - x.shape[1]), (0, 0), (0, d_to - x.shape[3])])

    # Edge padding keeps every block's min/max position (and segment) tight.
    q_pos = pad_seq(q_positions.astype(jnp.int32), tq_pad, "edge")
    kv_pos = pad_seq(kv_positions.astype(jnp.int32), tk_pad, "edge")
    if has_segments:
        q_seg = pad_seq(q_seg.astype(jnp.int32), tq_pad, "edge")
        kv_seg = pad_seq(kv_seg.astype(jnp.int32), tk_pad, "edge")

    hopper, hopper_bwd = _hopper_blocks(
        q, k, v, blocks, interpret, tq_pad=tq_pad, tk_pad=tk_pad,
        sliding_window=sliding_window, segment_ids=segment_ids,
        q_positions=q_positions_given, logit_soft_cap=logit_soft_cap, sinks=sinks,
        dropout_rate=dropout_rate or None)  # the Hopper kernels refuse any dropout
    masked = causal or sliding_window is not None or has_segments or tk_pad != tk
    cfg = _Config(hopper=hopper, hopper_bwd=hopper_bwd, causal=causal,
                  sliding_window=sliding_window,
                  logit_soft_cap=None if logit_soft_cap is None else float(logit_soft_cap),
                  sm_scale=float(sm_scale), has_segments=has_segments,
                  has_sinks=sinks is not None, kv_len=tk, masked=masked, blocks=blocks,
                  interpret=bool(interpret), dropout_rate=dropout_rate)
    span = functools.partial(block_spans, q_pos, kv_pos, q_seg, kv_seg, causal=causal,
                             sliding_window=sliding_window, q_len=tq, kv_len=tk)
    masks = (q_pos, kv_pos, q_seg, kv_seg,
             span(block_q=blocks.block_q, block_k=blocks.block_k, over="kv"),
             span(block_q=blocks.block_q_dq, block_k=blocks.block_kv_dq, over="kv"),
             span(block_q=blocks.block_q_dkv, block_k=blocks.block_kv_dkv, over="q"),
             _seed_array(dropout_seed) if dropout_rate else None)
    sinks32 = None if sinks is None else sinks.astype(jnp.float32)
    o, lse = _flash(pad_heads(q, tq_pad, d_pad), pad_heads(k, tk_pad, d_pad),
                    pad_heads(v, tk_pad, dv_pad), sinks32, masks, cfg)
    return o[:, :tq, :, :dv], lse[:, :, :tq]


def _seed_array(seed):
    """The dropout seed as the kernels' [1] int32 input, holding the uint32 bits keep_mask uses."""
    return jax.lax.bitcast_convert_type(dropout.seed_u32(seed), jnp.int32).reshape(1)


def is_hopper() -> bool:
    """True when the first device is a Hopper GPU (H100/H200: compute capability 9.0)."""
    device = jax.devices()[0]
    return device.platform == "gpu" and getattr(device, "compute_capability", None) == "9.0"




def _hopper_blocks(q, k, v, blocks: BlockSizes, interpret: bool, *, tq_pad, tk_pad, **features):
    """Tiles of the Hopper forward and backward for the passes they take, else None each.

    "auto" takes a Hopper kernel when the code runs compiled on a Hopper GPU and the call
    is one it covers; "hopper" takes it or raises a ValueError saying why not.
    """
    kernels = {"forward": (blocks.forward, gpu_hopper.HopperBlocks.get_default(q.shape[3]),
                           gpu_hopper.unsupported_reason),
               "backward": (blocks.backward, gpu_hopper_bwd.HopperBackwardBlocks(),
                            gpu_hopper_bwd.unsupported_reason)}
    chosen = []
    for field, (choice, tiles, unsupported) in kernels.items():
        runs_here = not interpret and is_hopper()
        if choice not in ("auto", "hopper") or (choice == "auto" and not runs_here):
            chosen.append(None)
            continue
        reason = unsupported(q, k, v, blocks=tiles, **features)
        if reason is None and (tq_pad, tk_pad) != (q.shape[1], k.shape[1]):
            reason = f"sequence padded for the Triton kernels' tiles ({q.shape[1]} -> {tq_pad})"
        if reason is None and interpret:
            reason = "the Mosaic GPU kernel has no interpret mode here (run it compiled on Hopper)"
        if reason is not None and choice == "hopper":
            raise ValueError(f"BlockSizes.{field}='hopper' cannot take this call: {reason}")
        chosen.append(None if reason else tiles)
    return tuple(chosen)


def flash_attention(q, k, v, **kwargs):
    """Attention output only; same arguments as `flash_attention_with_lse`."""
    return flash_attention_with_lse(q, k, v, **kwargs)[0]


def _backend(q, k, v, *, block_sizes=None, **kwargs):
    return flash_attention(q, k, v, block_sizes=block_sizes, **kwargs)


api.register_backend("pallas_gpu", _backend)
