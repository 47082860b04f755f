"""Flash attention for TPUs in Pallas (Mosaic lowering): forward and backward.

FlashAttention-2 (Dao, 2023, https://arxiv.org/abs/2307.08691) on the TPU grid model.
The forward grid is (batch, head, query block, key block); the key-block axis is the
innermost, sequential ("arbitrary") one, so a query block stays in VMEM while key/value
blocks stream past it and an online softmax in f32 VMEM scratch (running max m, running
sum l, accumulator acc) folds them in. The forward saves the log-sum-exp; the backward
recomputes the probabilities from it in two kernels: dq (key blocks innermost) and
dk/dv (query blocks and the query heads that share the kv head innermost, so GQA needs
no K/V repeat and no reduction afterwards). Tiles the mask hides are skipped, and those before or after
a row's live tiles cost no DMA either: the index maps keep a resident block (tpu_mask.py).

    import jax, jax.numpy as jnp
    from pallas_kernels.flash_attention import tpu
    q = jax.random.normal(jax.random.key(0), (1, 40, 4, 16), jnp.float32)
    k = v = jax.random.normal(jax.random.key(1), (1, 40, 2, 16), jnp.float32)
    o = tpu.flash_attention_tpu(q, k, v, causal=True,
                                block_sizes=tpu.BlockSizes(block_q=16, block_kv=16))
    o, lse = tpu.flash_attention_with_lse(q, k, v, causal=True)   # for ring attention

Off TPU the kernels run in Pallas TPU interpret mode (`pltpu.InterpretParams()`).

Layout: callers pass BTHD; inside, arrays are BHTD so a block is a (sequence, head_dim)
matrix for the MXU, and sequences are padded to whole blocks (padded keys are masked,
padded query rows dropped). Every mask of reference.py is supported, plus soft-capping
and attention sinks (a sink is one more softmax term with no value: it is merged into
the kernel's output by its log-sum-exp, exactly as ring attention merges blocks), and
attention dropout: each live tile regenerates its keep mask with dropout.keep_mask from
(seed, batch, query head, query row, key row), the seed an SMEM input, in the forward
(on p in P @ V only) and in the backward (on p in dV and on dp), as gpu.py does.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash_attention import dropout, reference, tpu_mask
from pallas_kernels.flash_attention.api import register_backend
from pallas_kernels.flash_attention.api import validate_inputs as validate_attention_inputs
from pallas_kernels.flash_attention.tpu_mask import NUM_LANES, MaskSpec, TokenRefs

_NT = (((1,), (1,)), ((), ()))  # dot_general dims for a @ b.T


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes; they change speed, not results.

    Attributes:
      block_q: query rows per tile of the forward kernel.
      block_kv: key rows per tile of the forward kernel.
      block_q_bwd: query rows per tile of the dq and dk/dv kernels (default block_q).
      block_kv_bwd: key rows per tile of the dq and dk/dv kernels (default block_kv).

    On TPU, block_kv must be a multiple of 128 (keys lie along the lanes) unless one
    block holds the whole sequence, and block_q a multiple of 8 (16 for 16-bit inputs).
    Interpret mode accepts any multiple of 8, so tests can use tiny tiles.
    """

    block_q: int = 128
    block_kv: int = 128
    block_q_bwd: int | None = None
    block_kv_bwd: int | None = None

    def __post_init__(self):
        for name in ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd"):
            value = getattr(self, name)
            if value is None and name.endswith("_bwd"):
                continue
            if not isinstance(value, int) or value <= 0 or value % 8:
                raise ValueError(f"{name}={value!r} must be a positive multiple of 8")

    def fitted(self, q_len: int, kv_len: int) -> BlockSizes:
        """Backward sizes filled in; a block longer than its sequence is shrunk to it,
        rounded up to 16 rows (a whole bf16 tile), so short sequences are not padded to 128."""
        fit = lambda block, length: min(block, _round_up(length, 16))
        return BlockSizes(
            block_q=fit(self.block_q, q_len),
            block_kv=fit(self.block_kv, kv_len),
            block_q_bwd=fit(self.block_q_bwd or self.block_q, q_len),
            block_kv_bwd=fit(self.block_kv_bwd or self.block_kv, kv_len),
        )


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about one call (hashable: it keys the compiled kernels)."""

    mask: MaskSpec
    sm_scale: float
    logit_soft_cap: float | None
    block_q: int
    block_kv: int
    interpret: object  # False on TPU, pltpu.InterpretParams() elsewhere
    dropout_rate: float = 0.0  # attention dropout; > 0 adds the seed input (SMEM)

    def with_blocks(self, block_q, block_kv):
        return dataclasses.replace(self, block_q=block_q, block_kv=block_kv)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# ----------------------------------------------------------------------- shared math


def _logits(q, k, cfg: _Config):
    """Scaled, soft-capped logits of a tile in f32, [bq, bkv]; also tanh for the backward."""
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * cfg.sm_scale
    if cfg.logit_soft_cap is None:
        return s, None
    t = jnp.tanh(s / cfg.logit_soft_cap)
    return cfg.logit_soft_cap * t, t


def _masked_logits(q_ref, k_ref, tokens: TokenRefs, cfg: _Config, *, q_block, kv_block):
    """Logits with dropped pairs at -inf (a fully dropped row stays all -inf)."""
    s, t = _logits(q_ref[...], k_ref[...], cfg)
    keep = tpu_mask.keep_mask(cfg.mask, tokens, q_block=q_block, kv_block=kv_block,
                              block_q=cfg.block_q, block_kv=cfg.block_kv)
    if keep is not None:
        s = jnp.where(keep, s, -jnp.inf)
    return s, t


def _dropout_keep(seed_ref, cfg: _Config, *, batch, head, q_block, kv_block):
    """dropout.keep_mask on one [bq, bkv] tile, from the unpadded query / key indices."""
    shape = (cfg.block_q, cfg.block_kv)
    q_idx = q_block * cfg.block_q + lax.broadcasted_iota(jnp.int32, shape, 0)
    kv_idx = kv_block * cfg.block_kv + lax.broadcasted_iota(jnp.int32, shape, 1)
    return dropout.keep_mask(seed_ref[0], batch, head, q_idx, kv_idx, rate=cfg.dropout_rate)


def _dropped(keep, x, cfg: _Config):
    """x * keep / (1 - rate): a kept entry scaled up, a dropped one 0."""
    return jnp.where(keep, x * (1.0 / (1.0 - cfg.dropout_rate)), 0.0)


def _live(cfg, q_bounds_ref, kv_bounds_ref, *, batch, q_block, kv_block, num_q, num_kv):
    return tpu_mask.block_is_live(
        cfg.mask, q_bounds_ref, kv_bounds_ref, batch=batch, q_block=q_block,
        kv_block=kv_block, num_q_blocks=num_q, num_kv_blocks=num_kv)


# ----------------------------------------------------------------------- forward


def _fwd_kernel(q_bounds_ref, kv_bounds_ref, _range_ref,  # scalar prefetch (SMEM)
                q_ref, k_ref, v_ref, q_pos_ref, kv_pos_ref, q_seg_ref, kv_seg_ref,  # inputs
                seed_ref,  # dropout seed [1] int32 in SMEM, None without dropout
                o_ref, lse_ref,  # outputs
                m_ref, l_ref, acc_ref,  # VMEM scratch, alive across the key-block axis
                *, cfg: _Config, num_q: int, num_kv: int):
    b, hi, qi, kj = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    tokens = TokenRefs(q_pos_ref, kv_pos_ref, q_seg_ref, kv_seg_ref)

    @pl.when(kj == 0)
    def _init():
        m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
        l_ref[...] = jnp.zeros_like(l_ref)
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @tpu_mask.when(_live(cfg, q_bounds_ref, kv_bounds_ref, batch=b, q_block=qi, kv_block=kj,
                         num_q=num_q, num_kv=num_kv))
    def _step():
        s, _ = _masked_logits(q_ref, k_ref, tokens, cfg, q_block=qi, kv_block=kj)
        m_prev, l_prev = m_ref[:, :1], l_ref[:, :1]  # [bq, 1] (scratch repeats over lanes)
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        # Rows with no kept key so far have m = -inf: subtract 0 instead, so that
        # exp(-inf - m) is 0, not NaN.
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe)  # [bq, bkv]
        alpha = jnp.exp(m_prev - m_safe)  # rescales what was summed under the old max
        l_ref[...] = jnp.broadcast_to(alpha * l_prev + p.sum(axis=1, keepdims=True), l_ref.shape)
        m_ref[...] = jnp.broadcast_to(m_new, m_ref.shape)
        v = v_ref[...]  # the MXU takes p in v's dtype (bf16 in training) and accumulates in f32
        if cfg.dropout_rate:  # l above sums the undropped p; only P @ V sees the dropout
            p = _dropped(_dropout_keep(seed_ref, cfg, batch=b, head=hi, q_block=qi,
                                       kv_block=kj), p, cfg)
        acc_ref[...] = alpha * acc_ref[...] + jnp.dot(
            p.astype(v.dtype), v, preferred_element_type=jnp.float32)

    @pl.when(kj == num_kv - 1)
    def _finish():
        l = l_ref[:, :1]
        empty = l == 0.0  # no kept key: output 0, log-sum-exp -inf (as reference.py)
        l_safe = jnp.where(empty, 1.0, l)
        o_ref[...] = (acc_ref[...] / l_safe).astype(o_ref.dtype)
        lse = jnp.where(empty, -jnp.inf, m_ref[:, :1] + jnp.log(l_safe))
        lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def _token_specs(cfg: _Config, q_rows, kv_rows):
    """BlockSpecs of the per-token arrays, following the blocks of q (`q_rows`) and k (`kv_rows`)."""
    mask = cfg.mask

    def q_map(*args):  # [B, Tq, 128]: (batch, q block, 0)
        bi, _, qi, _ = q_rows(*args)
        return bi, qi, 0

    def kv_map(*args):  # [B, 8, Tk]: (batch, 0, kv block)
        bi, _, kj, _ = kv_rows(*args)
        return bi, 0, kj

    q_spec = pl.BlockSpec((None, cfg.block_q, NUM_LANES), q_map)
    kv_spec = pl.BlockSpec((None, tpu_mask.NUM_SUBLANES, cfg.block_kv), kv_map)
    use_pos = mask.uses_positions and mask.has_positions
    return [q_spec if use_pos else None, kv_spec if use_pos else None,
            q_spec if mask.has_segments else None, kv_spec if mask.has_segments else None]


def _cost(q, k, *, flops_per_pair: int, arrays):
    """Cost estimate for XLA's scheduler (ignores skipped tiles)."""
    pairs = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]  # B * H * Tq * Tk
    nbytes = sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(arrays))
    return pl.CostEstimate(flops=int(flops_per_pair * pairs), transcendentals=int(pairs),
                           bytes_accessed=int(nbytes))


def _seed_spec(cfg: _Config):
    """The dropout seed ([1] int32), whole, in SMEM; None (no input) without dropout."""
    return pl.BlockSpec(memory_space=pltpu.SMEM) if cfg.dropout_rate else None


def _forward(q, k, v, tokens, seed, cfg: _Config):
    """Padded BHTD inputs -> o [B, H, Tq, Dv] (q.dtype), lse [B, H, Tq] (f32)."""
    b, h, tq, d = q.shape
    hkv, tk, dv = k.shape[1], k.shape[2], v.shape[3]
    group, bq, bkv = h // hkv, cfg.block_q, cfg.block_kv
    num_q, num_kv = tq // bq, tk // bkv

    def q_rows(bi, hi, qi, kj, *_):  # q, o, lse
        return bi, hi, qi, 0

    def kv_rows(bi, hi, qi, kj, q_bounds, kv_bounds, kv_range):  # k, v
        kj = tpu_mask.clamp_to_range(kj, kv_range, bi * num_q + qi)  # no DMA for dead tiles
        return bi, hi // group, kj, 0  # GQA: query head hi reads kv head hi // group

    in_specs = [
        pl.BlockSpec((None, None, bq, d), q_rows),
        pl.BlockSpec((None, None, bkv, d), kv_rows),
        pl.BlockSpec((None, None, bkv, dv), kv_rows),
        *_token_specs(cfg, q_rows, kv_rows),
        _seed_spec(cfg),
    ]
    out_specs = [pl.BlockSpec((None, None, bq, dv), q_rows),
                 pl.BlockSpec((None, None, bq, NUM_LANES), q_rows)]
    out_shape = [jax.ShapeDtypeStruct((b, h, tq, dv), q.dtype),
                 jax.ShapeDtypeStruct((b, h, tq, NUM_LANES), jnp.float32)]
    kernel = functools.partial(_fwd_kernel, cfg=cfg, num_q=num_q, num_kv=num_kv)
    name = f"flash_attention_tpu_fwd_bq{bq}_bkv{bkv}"
    with jax.named_scope(name):
        o, lse = pl.pallas_call(
            kernel,
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=3,
                grid=(b, h, num_q, num_kv),
                in_specs=in_specs,
                out_specs=out_specs,
                scratch_shapes=[pltpu.VMEM((bq, NUM_LANES), jnp.float32),  # m
                                pltpu.VMEM((bq, NUM_LANES), jnp.float32),  # l
                                pltpu.VMEM((bq, dv), jnp.float32)],  # acc
            ),
            out_shape=out_shape,
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
            cost_estimate=_cost(q, k, flops_per_pair=2 * (d + dv), arrays=(q, k, v, out_shape)),
            interpret=cfg.interpret,
            name=name,
        )(tokens.q_bounds, tokens.kv_bounds, tokens.kv_range, q, k, v, *tokens.arrays, seed)
    return o, lse[..., 0]  # lse was repeated over the lanes


# ----------------------------------------------------------------------- backward


def _probabilities(q_ref, k_ref, lse_ref, tokens, cfg, *, q_block, kv_block):
    """Recomputed softmax of the tile, [bq, bkv] f32, and tanh of the soft cap (or None)."""
    s, t = _masked_logits(q_ref, k_ref, tokens, cfg, q_block=q_block, kv_block=kv_block)
    return jnp.exp(s - lse_ref[:, :1]), t


def _logit_grad(p, do, v_ref, di_ref, t, keep=None, cfg=None):
    """dL/d(raw logit) of the tile: softmax backward, then through the soft cap.

    With dropout (`keep`) dp = (do v^T) * keep / (1 - rate); di = rowsum(o * do) - dlse
    is unchanged, since o already holds the dropout.
    """
    dp = lax.dot_general(do, v_ref[...], _NT, preferred_element_type=jnp.float32)
    if keep is not None:
        dp = _dropped(keep, dp, cfg)
    ds = p * (dp - di_ref[:, :1])  # [bq, bkv]
    if t is not None:  # d/ds [c * tanh(s / c)] = 1 - tanh^2
        ds = ds * (1.0 - t * t)
    return ds


def _dq_kernel(q_bounds_ref, kv_bounds_ref, _range_ref,
               q_ref, k_ref, v_ref, q_pos_ref, kv_pos_ref, q_seg_ref, kv_seg_ref,
               lse_ref, di_ref, do_ref, seed_ref,
               dq_ref,
               dq_acc_ref,
               *, cfg: _Config, num_q: int, num_kv: int):
    b, hi, qi, kj = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    tokens = TokenRefs(q_pos_ref, kv_pos_ref, q_seg_ref, kv_seg_ref)

    @pl.when(kj == 0)
    def _init():
        dq_acc_ref[...] = jnp.zeros_like(dq_acc_ref)

    @tpu_mask.when(_live(cfg, q_bounds_ref, kv_bounds_ref, batch=b, q_block=qi, kv_block=kj,
                         num_q=num_q, num_kv=num_kv))
    def _step():
        p, t = _probabilities(q_ref, k_ref, lse_ref, tokens, cfg, q_block=qi, kv_block=kj)
        keep = (_dropout_keep(seed_ref, cfg, batch=b, head=hi, q_block=qi, kv_block=kj)
                if cfg.dropout_rate else None)
        ds = _logit_grad(p, do_ref[...], v_ref, di_ref, t, keep, cfg)
        k = k_ref[...]
        dq_acc_ref[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(kj == num_kv - 1)
    def _finish():
        dq_ref[...] = (dq_acc_ref[...] * cfg.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(q_bounds_ref, kv_bounds_ref, _range_ref,
                q_ref, k_ref, v_ref, q_pos_ref, kv_pos_ref, q_seg_ref, kv_seg_ref,
                lse_ref, di_ref, do_ref, seed_ref,
                dk_ref, dv_ref,
                dk_acc_ref, dv_acc_ref,
                *, cfg: _Config, num_q: int, num_kv: int, group: int):
    # Grid (batch, kv head, kv block, query head in group, q block): the last two axes
    # run sequentially and both sum into this kv block's dk, dv.
    b, kj, g, qi = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    head = pl.program_id(1) * group + g  # the query head, for the dropout mask
    tokens = TokenRefs(q_pos_ref, kv_pos_ref, q_seg_ref, kv_seg_ref)

    @pl.when((g == 0) & (qi == 0))
    def _init():
        dk_acc_ref[...] = jnp.zeros_like(dk_acc_ref)
        dv_acc_ref[...] = jnp.zeros_like(dv_acc_ref)

    @tpu_mask.when(_live(cfg, q_bounds_ref, kv_bounds_ref, batch=b, q_block=qi, kv_block=kj,
                         num_q=num_q, num_kv=num_kv))
    def _step():
        p, t = _probabilities(q_ref, k_ref, lse_ref, tokens, cfg, q_block=qi, kv_block=kj)
        do = do_ref[...]
        keep = (_dropout_keep(seed_ref, cfg, batch=b, head=head, q_block=qi, kv_block=kj)
                if cfg.dropout_rate else None)
        p_drop = p if keep is None else _dropped(keep, p, cfg)
        dv_acc_ref[...] += jnp.dot(p_drop.astype(do.dtype).T, do,
                                   preferred_element_type=jnp.float32)
        ds = _logit_grad(p, do, v_ref, di_ref, t, keep, cfg)
        q = q_ref[...]
        dk_acc_ref[...] += jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=jnp.float32)

    @pl.when((g == group - 1) & (qi == num_q - 1))
    def _finish():
        dk_ref[...] = (dk_acc_ref[...] * cfg.sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def _backward(q, k, v, tokens, lse, di, do, seed, cfg: _Config):
    """Padded BHTD residuals and cotangent -> dq, dk, dv.

    lse, di: [B, H, Tq] f32; di = rowsum(o * do) - dlse (the lse cotangent enters the
    softmax backward as p * dlse, i.e. as a shift of di).
    """
    b, h, tq, d = q.shape
    hkv, tk, dv_dim = k.shape[1], k.shape[2], v.shape[3]
    group, bq, bkv = h // hkv, cfg.block_q, cfg.block_kv
    num_q, num_kv = tq // bq, tk // bkv
    # A row with no kept key has lse = -inf and only -inf logits: use lse = +inf there so
    # its probabilities exp(-inf - inf) are 0, not NaN.
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)
    lse, di = (jnp.broadcast_to(x[..., None], (*x.shape, NUM_LANES)) for x in (lse, di))
    residuals = (lse, di, do)  # [B,H,Tq,128], [B,H,Tq,128], [B,H,Tq,Dv]
    static = dict(cfg=cfg, num_q=num_q, num_kv=num_kv)
    params = lambda *sem: pltpu.CompilerParams(dimension_semantics=sem)

    # dq: grid (batch, head, q block, kv block), kv blocks innermost.
    def q_rows(bi, hi, qi, kj, *_):  # q, lse, di, do, dq
        return bi, hi, qi, 0

    def kv_rows(bi, hi, qi, kj, q_bounds, kv_bounds, kv_range):  # k, v
        return bi, hi // group, tpu_mask.clamp_to_range(kj, kv_range, bi * num_q + qi), 0

    def row_specs(q_rows, kv_rows):
        return [pl.BlockSpec((None, None, bq, d), q_rows),
                pl.BlockSpec((None, None, bkv, d), kv_rows),
                pl.BlockSpec((None, None, bkv, dv_dim), kv_rows),
                *_token_specs(cfg, q_rows, kv_rows),
                pl.BlockSpec((None, None, bq, NUM_LANES), q_rows),  # lse
                pl.BlockSpec((None, None, bq, NUM_LANES), q_rows),  # di
                pl.BlockSpec((None, None, bq, dv_dim), q_rows),  # do
                _seed_spec(cfg)]

    name = f"flash_attention_tpu_dq_bq{bq}_bkv{bkv}"
    with jax.named_scope(name):
        dq = pl.pallas_call(
            functools.partial(_dq_kernel, **static),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=3,
                grid=(b, h, num_q, num_kv),
                in_specs=row_specs(q_rows, kv_rows),
                out_specs=pl.BlockSpec((None, None, bq, d), q_rows),
                scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
            ),
            out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
            compiler_params=params("parallel", "parallel", "parallel", "arbitrary"),
            cost_estimate=_cost(q, k, flops_per_pair=2 * (2 * d + dv_dim),  # s, dp, dq
                                arrays=(q, k, v, residuals, q)),
            interpret=cfg.interpret,
            name=name,
        )(tokens.q_bounds, tokens.kv_bounds, tokens.kv_range, q, k, v, *tokens.arrays,
          *residuals, seed)

    # dk, dv: grid (batch, kv head, kv block, query head in group, q block).
    def q_head_rows(bi, hk, kj, g, qi, q_bounds, kv_bounds, q_range):  # q, lse, di, do
        return bi, hk * group + g, tpu_mask.clamp_to_range(qi, q_range, bi * num_kv + kj), 0

    def own_rows(bi, hk, kj, g, qi, *_):  # k, v, dk, dv
        return bi, hk, kj, 0

    name = f"flash_attention_tpu_dkv_bq{bq}_bkv{bkv}"
    with jax.named_scope(name):
        dk, dv = pl.pallas_call(
            functools.partial(_dkv_kernel, group=group, **static),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=3,
                grid=(b, hkv, num_kv, group, num_q),
                in_specs=row_specs(q_head_rows, own_rows),
                out_specs=[pl.BlockSpec((None, None, bkv, d), own_rows),
                           pl.BlockSpec((None, None, bkv, dv_dim), own_rows)],
                scratch_shapes=[pltpu.VMEM((bkv, d), jnp.float32),
                                pltpu.VMEM((bkv, dv_dim), jnp.float32)],
            ),
            out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                       jax.ShapeDtypeStruct(v.shape, v.dtype)],
            compiler_params=params("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
            cost_estimate=_cost(q, k, flops_per_pair=4 * (d + dv_dim),  # s, dv, dp, dk
                                arrays=(q, k, v, residuals, k, v)),
            interpret=cfg.interpret,
            name=name,
        )(tokens.q_bounds, tokens.kv_bounds, tokens.q_range, q, k, v, *tokens.arrays,
          *residuals, seed)
    return dq, dk, dv


# ----------------------------------------------------------------------- custom_vjp


class _Tokens(NamedTuple):
    """Per-token data laid out for one tiling (block_q, block_kv)."""

    q_bounds: jax.Array  # [B * nq * 4] int32, flat for SMEM: tpu_mask.block_bounds
    kv_bounds: jax.Array  # [B * nk * 4]
    kv_range: jax.Array  # [B * nq * 2]: first, last live kv block of each q block
    q_range: jax.Array  # [B * nk * 2]: first, last live q block of each kv block
    arrays: tuple  # q_pos [B,Tq,128], kv_pos [B,8,Tk], q_seg, kv_seg; None where unused


def _tokens(raw, cfg: _Config, tq_pad: int, tk_pad: int) -> _Tokens:
    q_pos, kv_pos, q_seg, kv_seg = raw  # [B, Tq] / [B, Tk] int32; segments may be None
    pad, mask = tpu_mask.pad_to, cfg.mask
    q_bounds = tpu_mask.block_bounds(
        pad(q_pos, tq_pad), None if q_seg is None else pad(q_seg, tq_pad), cfg.block_q)
    kv_bounds = tpu_mask.block_bounds(
        pad(kv_pos, tk_pad), None if kv_seg is None else pad(kv_seg, tk_pad), cfg.block_kv)
    live = tpu_mask.tile_liveness(mask, q_bounds, kv_bounds)  # [B, nq, nk]
    use_pos = mask.uses_positions and mask.has_positions
    return _Tokens(
        q_bounds=q_bounds.reshape(-1), kv_bounds=kv_bounds.reshape(-1),
        kv_range=tpu_mask.live_range(live).reshape(-1),
        q_range=tpu_mask.live_range(jnp.swapaxes(live, 1, 2)).reshape(-1),
        arrays=(tpu_mask.as_query_column(q_pos, tq_pad) if use_pos else None,
                tpu_mask.as_key_row(kv_pos, tk_pad) if use_pos else None,
                tpu_mask.as_query_column(q_seg, tq_pad) if mask.has_segments else None,
                tpu_mask.as_key_row(kv_seg, tk_pad) if mask.has_segments else None))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, raw_tokens, seed, fwd_cfg: _Config, bwd_cfg: _Config):
    """BHTD, sequences padded to whole blocks of both configs -> (o, lse).

    `seed`: the dropout seed, [1] int32 (None without dropout); the backward regenerates
    the forward's mask from it.
    """
    return _attention_fwd(q, k, v, raw_tokens, seed, fwd_cfg, bwd_cfg)[0]


def _attention_fwd(q, k, v, raw_tokens, seed, fwd_cfg, bwd_cfg):
    tq, tk = q.shape[2], k.shape[2]
    tokens = _tokens(raw_tokens, fwd_cfg, tq, tk)
    o, lse = _forward(q, k, v, tokens, seed, fwd_cfg)
    return (o, lse), (q, k, v, raw_tokens, seed, o, lse)


def _attention_bwd(fwd_cfg, bwd_cfg, residuals, cotangents):
    del fwd_cfg
    q, k, v, raw_tokens, seed, o, lse = residuals
    do, dlse = cotangents
    di = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1) - dlse  # [B,H,Tq]
    tq, tk = q.shape[2], k.shape[2]
    tokens = _tokens(raw_tokens, bwd_cfg, tq, tk)
    dq, dk, dv = _backward(q, k, v, tokens, lse, di, do.astype(q.dtype), seed, bwd_cfg)
    return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# ----------------------------------------------------------------------- public API


def _default_interpret():
    return False if jax.default_backend() == "tpu" else pltpu.InterpretParams()


def _check_kernel_inputs(q, segment_ids, q_positions, kv_positions, logit_soft_cap,
                         sm_scale, block_sizes):
    """What the kernel adds to api.py's checks (ValueError naming the argument)."""
    for name, x in (("q_positions", q_positions), ("kv_positions", kv_positions)):
        if x is not None and not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name}.dtype={x.dtype} must be an integer type (int32)")
    seg = reference.split_segment_ids(segment_ids, 0, 0)
    for name, x in zip(("q segment_ids", "kv segment_ids"), seg, strict=True):
        if x is not None and not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} dtype={x.dtype} must be an integer type")
    if logit_soft_cap is not None and not logit_soft_cap > 0:
        raise ValueError(f"{logit_soft_cap=} must be a positive float or None")
    if sm_scale is not None and not sm_scale > 0:
        raise ValueError(f"{sm_scale=} must be a positive float or None")
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes must be a tpu.BlockSizes or None, got {block_sizes!r}")


def _check_tpu_tiling(blocks: BlockSizes, q, tq_pad: int, tk_pad: int):
    """Compiled Mosaic needs (8, 128)-aligned tiles (16 rows for 16-bit data)."""
    rows = 8 * 4 // min(q.dtype.itemsize, 4)
    for name, bq, bkv in (("", blocks.block_q, blocks.block_kv),
                          ("_bwd", blocks.block_q_bwd, blocks.block_kv_bwd)):
        if bq % rows:
            raise ValueError(f"block_q{name}={bq} must be a multiple of {rows} for {q.dtype} on TPU")
        if bkv % NUM_LANES and bkv != tk_pad:
            raise ValueError(f"block_kv{name}={bkv} must be a multiple of {NUM_LANES} on TPU "
                             f"(or cover the whole padded kv length {tk_pad})")


def flash_attention_with_lse(q, k, v, *, causal: bool = False, sliding_window: int | None = None,
                             segment_ids=None, q_positions=None, kv_positions=None,
                             logit_soft_cap: float | None = None, sm_scale: float | None = None,
                             sinks=None, dropout_rate: float = 0.0, dropout_seed=None,
                             block_sizes: BlockSizes | None = None, interpret=None):
    """Attention output [B, Tq, H, Dv] and its log-sum-exp [B, H, Tq] (f32, -inf on empty rows).

    Both outputs are differentiable, so partial results can be merged by their
    log-sum-exp (ring attention) under `jax.grad`. Arguments as in
    `reference.mha_reference` (the lse is the undropped softmax's); `interpret=None`
    picks interpret mode off TPU.
    """
    validate_attention_inputs(q, k, v, segment_ids, q_positions, kv_positions, sliding_window,
                              sinks, "pallas_tpu")
    dropout_rate = dropout.check_dropout(dropout_rate, dropout_seed,
                                         where="tpu.flash_attention_with_lse")
    _check_kernel_inputs(q, segment_ids, q_positions, kv_positions, logit_soft_cap, sm_scale,
                         block_sizes)
    b, tq, h, d = q.shape
    tk = k.shape[1]
    blocks = (block_sizes or BlockSizes()).fitted(tq, tk)
    # Pad once to a common multiple of the forward and backward blocks.
    tq_pad = _round_up(tq, math.lcm(blocks.block_q, blocks.block_q_bwd))
    tk_pad = _round_up(tk, math.lcm(blocks.block_kv, blocks.block_kv_bwd))
    if interpret is None:
        interpret = _default_interpret()
    if not interpret:
        _check_tpu_tiling(blocks, q, tq_pad, tk_pad)
    q_seg, kv_seg = reference.split_segment_ids(segment_ids, tq, tk)
    mask = MaskSpec(causal=bool(causal), sliding_window=sliding_window,
                    has_segments=q_seg is not None, has_positions=q_positions is not None,
                    q_offset=tk - tq, kv_len=tk, kv_padded_len=tk_pad)
    cfg = _Config(mask=mask, sm_scale=float(d**-0.5 if sm_scale is None else sm_scale),
                  logit_soft_cap=None if logit_soft_cap is None else float(logit_soft_cap),
                  block_q=blocks.block_q, block_kv=blocks.block_kv, interpret=interpret,
                  dropout_rate=dropout_rate)
    bwd_cfg = cfg.with_blocks(blocks.block_q_bwd, blocks.block_kv_bwd)
    # The seed as a [1] int32 holding the uint32 bits keep_mask reads (None: no dropout).
    seed = (lax.bitcast_convert_type(dropout.seed_u32(dropout_seed), jnp.int32).reshape(1)
            if dropout_rate else None)
    return _flash_bthd(q, k, v, q_seg, kv_seg, q_positions, kv_positions, sinks, seed,
                       cfg, bwd_cfg, tq_pad, tk_pad)


@functools.partial(jax.jit, static_argnums=(9, 10, 11, 12))
def _flash_bthd(q, k, v, q_seg, kv_seg, q_positions, kv_positions, sinks, seed,
                cfg, bwd_cfg, tq_pad, tk_pad):
    """BTHD in and out; in between BHTD padded to whole blocks, through the custom_vjp."""
    b, tq, h, _ = q.shape
    tk = k.shape[1]
    if q_positions is None:
        q_positions, kv_positions = reference.default_positions(b, tq, tk)
    raw_tokens = (q_positions.astype(jnp.int32), kv_positions.astype(jnp.int32),
                  None if q_seg is None else q_seg.astype(jnp.int32),
                  None if kv_seg is None else kv_seg.astype(jnp.int32))

    def to_bhtd(x, length):  # [B, T, H, D] -> [B, H, T_padded, D]
        x = jnp.swapaxes(x, 1, 2)
        return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))

    o, lse = _attention(to_bhtd(q, tq_pad), to_bhtd(k, tk_pad), to_bhtd(v, tk_pad),
                        raw_tokens, seed, cfg, bwd_cfg)
    o = jnp.swapaxes(o[:, :, :tq], 1, 2)  # [B, Tq, H, Dv]
    lse = lse[:, :, :tq]  # [B, H, Tq]
    if sinks is not None:
        # A sink adds exp(sink) to the softmax denominator and nothing to the output: merge
        # it with the kernel's result by log-sum-exp (exp(-inf) = 0 on empty rows).
        sink = sinks.astype(jnp.float32)[None, :, None]  # [1, H, 1]
        lse_all = jnp.logaddexp(lse, sink)
        scale = jnp.exp(lse - lse_all)  # [B, H, Tq]
        o = (o.astype(jnp.float32) * jnp.swapaxes(scale, 1, 2)[..., None]).astype(q.dtype)
        lse = lse_all
    return o, lse


def flash_attention_tpu(q, k, v, *, causal: bool = False, sliding_window: int | None = None,
                        segment_ids=None, q_positions=None, kv_positions=None,
                        logit_soft_cap: float | None = None, sm_scale: float | None = None,
                        sinks=None, dropout_rate: float = 0.0, dropout_seed=None,
                        block_sizes: BlockSizes | None = None, interpret=None):
    """Attention output [B, Tq, H, Dv]; the `pallas_tpu` backend of `api.flash_attention`."""
    o, _ = flash_attention_with_lse(
        q, k, v, causal=causal, sliding_window=sliding_window, segment_ids=segment_ids,
        q_positions=q_positions, kv_positions=kv_positions, logit_soft_cap=logit_soft_cap,
        sm_scale=sm_scale, sinks=sinks, dropout_rate=dropout_rate, dropout_seed=dropout_seed,
        block_sizes=block_sizes, interpret=interpret)
    return o


register_backend("pallas_tpu", flash_attention_tpu)
