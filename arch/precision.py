"""Matmul precision: the one dot of every projection, in model.dtype or in FP8.

`model.matmul_precision` picks how `Linear` (attention q/k/v/o, MLP, MLA projections)
and the MoE experts (`grouped_dot`, `expert_dot`: tensorwise and rowwise) multiply;
embeddings, the output head, the MoE router, norms and attention itself stay in
model.dtype (DeepSeek-V3, arXiv:2412.19437 sec. 3.3, keeps embeddings, head, gating,
norms and attention in higher precision too).

  "bf16"            x @ W in model.dtype (bf16 in every config; f32 in tests), no quantisation
  "fp8_tensorwise"  one scale per tensor
  "fp8_rowwise"     one scale per row of x (token) and per column of W (output channel);
                    the scales sit on the dims the matmul keeps, so they factor out of it
  "fp8_blockwise"   DeepSeek-V3: x in 1 x 128 tiles along K, W in 128 x 128 blocks; the
                    scales sit on the contracted dim, so the matmul runs per 128-slice of
                    K and the f32 partial sums are scaled and added (slow without a kernel
                    that does this in its epilogue: here it is the numerics, not a speed-up)

Forward operands are E4M3 (max 448), the output gradient E5M2 (max 57344: more range for
gradients, as Micikevicius et al. 2022, arXiv:2209.05433); accumulation is f32. Scaling is
*current*: each call measures amax and quantises with scale = amax / max, so a value maps
to x / scale, saturated to the format's range. The backward quantises again along the
axes its two matmuls keep (dx = dy Wᵀ keeps M and K; dW = xᵀ dy keeps K and N), as
torchao's float8 rowwise does. Master weights and optimizer state stay f32: only the
operands of the matmul are cast.

On Hopper, XLA lowers a dot of float8 operands with f32 output to cuBLASLt's FP8 GEMM;
elsewhere it runs upcast (same numbers, no speed-up). With jax 0.11.2 on an H200 a whole
training step in fp8_rowwise did not finish compiling in 250 s under default flags, and
compiled normally with `XLA_FLAGS=--xla_gpu_enable_triton_gemm=false` (the dots then go
to cuBLASLt; bench/results/fp8.md): set it when training in fp8_rowwise on a GPU.

    >>> y = dot(x, w, "fp8_rowwise")            # x [..., K], w [K, N] -> [..., N] in x.dtype
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul import gmm, tgmm

MATMUL_PRECISIONS = ("bf16", "fp8_tensorwise", "fp8_rowwise", "fp8_blockwise")
E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2
BLOCK = 128  # DeepSeek-V3's tile: 1 x 128 activations, 128 x 128 weights


def check_precision(precision: str) -> None:
    if precision not in MATMUL_PRECISIONS:
        raise ValueError(f"model.matmul_precision={precision!r} must be one of {MATMUL_PRECISIONS}")


def quantize(x, axes, dtype=E4M3):
    """(x_q in `dtype`, f32 scale) with amax over `axes` (None: the whole tensor).

    scale = amax / max(dtype) (keepdims, so x ≈ x_q * scale); an all-zero slice gets
    scale 1 rather than 0.
    """
    x = x.astype(jnp.float32)
    fmax = float(jnp.finfo(dtype).max)
    amax = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
    scale = jnp.where(amax > 0, amax / fmax, 1.0)
    return jnp.clip(x / scale, -fmax, fmax).astype(dtype), scale


def _dot_f32(a, b):
    return jax.lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _blocks(x, rows: int, cols: int):
    """[R, C] -> [R/rows, rows, C/cols, cols] (both divisible)."""
    r, c = x.shape
    return x.reshape(r // rows, rows, c // cols, cols)


def quantize_blockwise(x, rows: int, cols: int, dtype=E4M3):
    """(x_q [R, C], scale [R/rows, C/cols]) with one scale per rows x cols block."""
    q, s = quantize(_blocks(x, rows, cols), (1, 3), dtype)
    return q.reshape(x.shape), s[:, 0, :, 0]


def _blockwise_dot(aq, sa, bq, sb):
    """sum over K blocks of (a_q b_q)[per 128 of K] * s_a * s_b, f32.

    aq [M, K] with sa [M, K/128] (1 x 128 tiles); bq [K, N] with sb [K/128, N/128].
    """
    m, k = aq.shape
    n = bq.shape[1]
    kb = k // BLOCK
    a = aq.reshape(m, kb, BLOCK).swapaxes(0, 1)                  # [KB, M, 128]
    b = bq.reshape(kb, BLOCK, n)                                 # [KB, 128, N]
    sb_cols = jnp.repeat(sb, BLOCK, axis=1)                      # [KB, N]

    def body(acc, xs):
        ak, bk, sak, sbk = xs
        part = _dot_f32(ak, bk)                                  # [M, N]
        return acc + part * sak[:, None] * sbk[None, :], None

    acc, _ = jax.lax.scan(body, jnp.zeros((m, n), jnp.float32), (a, b, sa.T, sb_cols))
    return acc


def _check_blockwise(x2, w):
    k, n = w.shape
    if k % BLOCK or n % BLOCK:
        raise ValueError(f"model.matmul_precision='fp8_blockwise' needs both dims of every "
                         f"projection weight divisible by {BLOCK}; got [{k}, {n}]")


# ----------------------------------------------------------------------------- the dot
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fp8_dot(x, w, mode: str):
    return _fp8_forward(x, w, mode)[0]


def _fp8_forward(x, w, mode):
    if mode == "fp8_tensorwise":
        xq, sx = quantize(x, None)
        wq, sw = quantize(w, None)
        y = _dot_f32(xq, wq) * (sx * sw)
    elif mode == "fp8_rowwise":
        xq, sx = quantize(x, (1,))                               # [M, 1]
        wq, sw = quantize(w, (0,))                               # [1, N]
        y = _dot_f32(xq, wq) * sx * sw
    else:
        xq, sx = quantize_blockwise(x, 1, BLOCK)                 # [M, K/128]
        wq, sw = quantize_blockwise(w, BLOCK, BLOCK)             # [K/128, N/128]
        y = _blockwise_dot(xq, sx, wq, sw)
    return y.astype(x.dtype), (x, w)


def _fp8_dot_fwd(x, w, mode):
    return _fp8_forward(x, w, mode)


def _fp8_dot_bwd(mode, res, dy):
    x, w = res
    if mode == "fp8_tensorwise":
        dyq, sdy = quantize(dy, None, E5M2)
        wq, sw = quantize(w, None)
        xq, sx = quantize(x, None)
        dx = _dot_f32(dyq, wq.T) * (sdy * sw)
        dw = _dot_f32(xq.T, dyq) * (sx * sdy)
    elif mode == "fp8_rowwise":
        dyq, sdy = quantize(dy, (1,), E5M2)                      # dx keeps M: per row of dy
        wq, sw = quantize(w, (1,))                               # ... and K: per row of W
        dx = _dot_f32(dyq, wq.T) * sdy * sw.T
        xq, sx = quantize(x, (0,))                               # dW keeps K: per column of x
        dyq2, sdy2 = quantize(dy, (0,), E5M2)                    # ... and N: per column of dy
        dw = _dot_f32(xq.T, dyq2) * sx.T * sdy2
    else:
        dyq, sdy = quantize_blockwise(dy, 1, BLOCK, E5M2)        # [M, N/128] tiles along N
        wq, sw = quantize_blockwise(w, BLOCK, BLOCK)             # blocks: transpose is blocks
        dx = _blockwise_dot(dyq, sdy, wq.T, sw.T)
        xq, sx = quantize_blockwise(x.T, 1, BLOCK)               # [K, M/128] tiles along M
        dyq2, sdy2 = quantize_blockwise(dy, BLOCK, BLOCK, E5M2)  # [M/128, N/128] blocks
        dw = _blockwise_dot(xq, sx, dyq2, sdy2)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_fp8_dot.defvjp(_fp8_dot_fwd, _fp8_dot_bwd)


def dot(x, w, precision: str = "bf16"):
    """x [..., K] @ w [K, N] -> [..., N] in x.dtype, with `precision` (see module doc).

    Blockwise needs K, N and the row count divisible by 128 (the trainer's batch x seq
    always is; a ValueError names the field otherwise).
    """
    check_precision(precision)
    if precision == "bf16":
        return jnp.dot(x, w.astype(x.dtype))
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    w = w.astype(x.dtype)
    if precision == "fp8_blockwise":
        _check_blockwise(x2, w)
        if x2.shape[0] % BLOCK:
            raise ValueError(f"model.matmul_precision='fp8_blockwise' needs the token count "
                             f"(batch x seq = {x2.shape[0]}) divisible by {BLOCK} (dW tiles)")
    return _fp8_dot(x2, w, precision).reshape(*lead, w.shape[1])


# ----------------------------------------------------------------------------- MoE experts
# The experts' FP8: each expert's matrix is its own tensor, so "tensorwise" is one scale per
# expert ([G, 1, 1]) and "rowwise" one per (expert, output column) ([G, 1, N]); the tokens'
# scales are per tensor / per row as above. Grouped rows of many experts then need their
# expert's scales gathered per row after the grouped matmul. The backward's gradients are
# E4M3 here (DeepSeek-V3's choice with current fine-grained scaling), not E5M2: the grouped
# matmul takes one float8 dtype for both operands. Blockwise (per-128 slices of K, scaled
# and summed) would need a grouped kernel that scales in its epilogue: not implemented.
EXPERT_PRECISIONS = ("bf16", "fp8_tensorwise", "fp8_rowwise")


def check_expert_precision(precision: str) -> None:
    """ValueError for a precision the MoE experts cannot take (fp8_blockwise)."""
    check_precision(precision)
    if precision not in EXPERT_PRECISIONS:
        raise ValueError(f"model.matmul_precision={precision!r} is not implemented for the MoE "
                         f"experts; a model with MoE layers takes one of {EXPERT_PRECISIONS}")


def expert_dot(x, w, precision: str = "bf16"):
    """Each expert's matrix on its own rows: x [E, C, K], w [E, K, N] -> [E, C, N] in x.dtype
    (the capacity buffers; `dot` per expert, so the scales are per expert)."""
    if precision == "bf16":
        return jnp.einsum("eck,ekn->ecn", x, w.astype(x.dtype))
    check_expert_precision(precision)
    return jax.vmap(functools.partial(dot, precision=precision))(x, w)


def grouped_dot(x, w, group_sizes, precision: str = "bf16", *, impl: str = "auto"):
    """Rows grouped by expert times their expert's matrix: x [M, K], w [G, K, N],
    group_sizes [G] -> [M, N] in x.dtype (pallas_kernels.gmm with `impl`)."""
    if precision == "bf16":
        return gmm(x, w.astype(x.dtype), group_sizes, impl=impl)
    check_expert_precision(precision)
    return _fp8_grouped(x, w.astype(x.dtype), group_sizes, precision, impl)


def _row_expert(group_sizes, rows: int):
    """[rows] the expert of each row (rows past sum(group_sizes) get the last; their
    output is 0 whatever their scale)."""
    g = group_sizes.shape[0]
    return jnp.repeat(jnp.arange(g), group_sizes, total_repeat_length=rows)


def _gmm_f32(a, b, group_sizes, impl):
    return gmm(a, b, group_sizes, impl=impl, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fp8_grouped(x, w, group_sizes, mode: str, impl: str):
    return _fp8_grouped_fwd(x, w, group_sizes, mode, impl)[0]


def _fp8_grouped_fwd(x, w, group_sizes, mode, impl):
    per_row = (1,) if mode == "fp8_rowwise" else None
    xq, sx = quantize(x, per_row)                                # [M, 1] or [1, 1]
    wq, sw = quantize(w, (1,) if mode == "fp8_rowwise" else (1, 2))  # [G, 1, N] or [G, 1, 1]
    e = _row_expert(group_sizes, x.shape[0])
    y = _gmm_f32(xq, wq, group_sizes, impl) * sx * sw[e, 0, :]
    return y.astype(x.dtype), (x, w, group_sizes)


def _fp8_grouped_bwd(mode, impl, res, dy):
    x, w, group_sizes = res
    e = _row_expert(group_sizes, x.shape[0])
    rowwise = mode == "fp8_rowwise"
    # dx = dy W^T keeps M (rows of dy) and K (rows of each expert's W).
    dyq, sdy = quantize(dy, (1,) if rowwise else None)
    wq, sw = quantize(w, (2,) if rowwise else (1, 2))            # [G, K, 1] or [G, 1, 1]
    dx = _gmm_f32(dyq, jnp.swapaxes(wq, 1, 2), group_sizes, impl) * sdy * sw[e, :, 0]
    # dW_g = x_g^T dy_g keeps K (columns of x) and N (columns of dy); scales over all rows.
    xq, sx = quantize(x, (0,) if rowwise else None)              # [1, K] or [1, 1]
    dyq2, sdy2 = quantize(dy, (0,) if rowwise else None)         # [1, N] or [1, 1]
    dw = tgmm(xq, dyq2, group_sizes, impl=impl, preferred_element_type=jnp.float32)
    dw = dw * sx[0][None, :, None] * sdy2[0][None, None, :]
    return dx.astype(x.dtype), dw.astype(w.dtype), None


_fp8_grouped.defvjp(_fp8_grouped_fwd, _fp8_grouped_bwd)
