"""The chunked SSD backward for TPUs in Pallas (Mosaic lowering): two kernels.

The forward (tpu.py) runs the chunks in order with the state in VMEM scratch. The
backward needs the state entering each chunk and runs the chunks in reverse, carrying the
state's cotangent instead:

  states     grid (batch, head, chunk), chunks in order: S_in[c] (the forward's state
             update, S <- gate S + (x w_end)^T B), written out [B, H, nc, P, N].
  backward   grid (batch, head, chunk), chunks in reverse, with G = the cotangent of the
             state leaving the chunk in VMEM scratch (the final state's cotangent first):
             dx, dB, dC of the chunk's quadratic form, its entering-state read-out and
             its state update, the cotangents of the per-token decays, and
             G <- gate G + sum_t decay_in_t dy_t^T C_t for the chunk before; after chunk
             0, G is the initial state's cotangent.

The per-token decays (cum, dt, w_end, decay_in, gate: reference.chunk_scalars) come in as
rows computed in jnp, and their cotangents go out as rows, so `jax.vjp` of chunk_scalars
carries them to dt and A, as in the GPU backward (gpu_bwd.py, which has the formulas).
Every matmul is a plain or B-transposed product (`_NN`, `_NT`): the transposed pair
matrices ([s, t]: B C^T, x dy^T) are built directly rather than transposed in the kernel,
and dy also comes transposed [P, T] for the state's cotangent. The heads of one group
write their own dB and dC, summed over the group afterwards. Like the forward, compiled
on a TPU chunk_size must be a multiple of 128; not yet run compiled on a TPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ssd import api, reference, tpu

f32 = jnp.float32
_NN, _NT, _column, _last = tpu._NN, tpu._NT, tpu._column, tpu._last


def _dot(a, b, dims):
    return lax.dot_general(a, b, dims, preferred_element_type=f32)


def _row(col, eye):
    """A [Q, 1] column as a [1, Q] row: sum over sublanes of where(eye, col, 0)."""
    return jnp.sum(jnp.where(eye, col, 0.0), axis=0, keepdims=True)


# ----------------------------------------------------------------------------- states
def _states_kernel(xt_ref, b_ref, w_ref, gate_ref, init_ref, s_in_ref, state_ref):
    @pl.when(pl.program_id(2) == 0)
    def _():
        state_ref[...] = init_ref[...]

    s = state_ref[...]
    s_in_ref[...] = s
    lane = lax.broadcasted_iota(jnp.int32, gate_ref.shape, 1)
    bmat = b_ref[...]
    xw = (xt_ref[...].astype(f32) * w_ref[...]).astype(bmat.dtype)          # [P, Q]
    state_ref[...] = _last(gate_ref[...], lane) * s + _dot(xw, bmat, _NN)


# ----------------------------------------------------------------------------- backward
def _bwd_kernel(x_ref, dy_ref, dyt_ref, b_ref, c_ref, cum_ref, dt_ref, seq_ref, w_ref, din_ref,
                gate_ref, s_ref, d_ref, dfinal_ref,
                dx_ref, db_ref, dc_ref, ddt_ref, dcum_ref, dw_ref, ddin_ref, dgate_ref, dinit_ref,
                g_ref, *, chunk: int):
    hh, step = pl.program_id(1), pl.program_id(2)

    @pl.when(step == 0)  # the last chunk: the final state's cotangent
    def _():
        g_ref[...] = dfinal_ref[...]

    row_i = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    col_i = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    eye = row_i == col_i
    lane = lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
    cum, dt, seq, din = cum_ref[...], dt_ref[...], seq_ref[...], din_ref[...]  # [1, Q] rows
    cum_c, dt_c, seq_c = _column(cum, eye), _column(dt, eye), _column(seq, eye)
    w_c, din_c = _column(w_ref[...], eye), _column(din, eye)
    x, dy, bmat, cmat = x_ref[...], dy_ref[...], b_ref[...], c_ref[...]
    same = seq_c == seq
    # L[t, s] = exp(cum_t - cum_s) on s <= t; LT[s, t] the same pairs, transposed.
    L = jnp.exp(jnp.where((row_i >= col_i) & same, cum_c - cum, -jnp.inf))
    LT = jnp.exp(jnp.where((row_i <= col_i) & same, cum - cum_c, -jnp.inf))

    # Rows t: dC_t and the cotangents of cum_t and decay_in_t.
    dm = _dot(dy, x, _NT)                                     # [t, s] dy_t . x_s
    dcb = dm * L * dt                                         # times dt_s (a row)
    ys = _dot(dy, s_ref[...].astype(dy.dtype), _NN)           # [Q, N] dy_t S_in
    dc = _dot(dcb.astype(bmat.dtype), bmat, _NN) + din_c * ys
    dcum_t = jnp.sum(dcb * _dot(cmat, bmat, _NT), axis=1, keepdims=True)
    ddin_ref[...] = _row(jnp.sum(ys * cmat.astype(f32), axis=1, keepdims=True), eye)

    # Columns s: dx_s, dB_s, ddt_s (transposed pairs [s, t]).
    bcl = _dot(bmat, cmat, _NT) * LT                          # (B_s . C_t) L_ts
    dmt = _dot(x, dy, _NT)                                    # x_s . dy_t
    dx = _dot((bcl * dt_c).astype(dy.dtype), dy, _NN)
    db = _dot((dmt * LT * dt_c).astype(cmat.dtype), cmat, _NN)
    ddt = jnp.sum(dmt * bcl, axis=1, keepdims=True)           # [Q, 1]
    ddt_ref[...] = _row(ddt, eye)
    dcum_ref[...] = _row(dcum_t - dt_c * ddt, eye)

    # The chunk's state update S_out = gate S_in + sum_s w_s x_s^T B_s, with G = dS_out.
    g = g_ref[...]                                            # [P, N] f32
    u = _dot(bmat, g.astype(bmat.dtype), _NT)                 # [Q, P] B_s G^T
    dw_ref[...] = _row(jnp.sum(x.astype(f32) * u, axis=1, keepdims=True), eye)
    dx_ref[...] = (dx + w_c * u + d_ref[hh] * dy.astype(f32)).astype(dx_ref.dtype)
    db_ref[...] = db + w_c * _dot(x, g.astype(x.dtype), _NN)
    dc_ref[...] = dc
    s_in = s_ref[...]
    dgate = jnp.sum(jnp.sum(g * s_in, axis=1, keepdims=True), axis=0, keepdims=True)  # [1, 1]
    dgate_ref[...] = jnp.where(lane == chunk - 1, dgate, 0.0)  # gate is a row of repeats
    # The cotangent of S_in: through the gate, and read out by C into this chunk's y.
    dyw = (dyt_ref[...].astype(f32) * din).astype(cmat.dtype)  # [P, Q]
    g = _last(gate_ref[...], lane) * g + _dot(dyw, cmat, _NN)
    g_ref[...] = g

    @pl.when(step == pl.num_programs(2) - 1)
    def _():
        dinit_ref[...] = g


def ssd_backward(x, dt, A, B, C, D, segment_ids, initial_state, dy, dfinal, *, chunk_size: int,
                 block_sizes=None, interpret=None):
    """Cotangents (dx, ddt, dA, dB, dC, dD, d initial_state) of tpu.ssd_forward's outputs.

    dD and d initial_state are None where D or initial_state is None.
    """
    if block_sizes is not None and not isinstance(block_sizes, tpu.BlockSizes):
        raise ValueError(f"block_sizes must be a tpu.BlockSizes or None, got {block_sizes!r}")
    interpret = tpu._default_interpret() if interpret is None else interpret
    b, t, h, p = x.shape
    g, n = B.shape[2:]
    rep, q = h // g, chunk_size
    seq = reference.padded_seq_index(segment_ids, b, t, q)  # an int: outside the vjp

    def prepare(x, dt, A, B, C):
        """Head-major kernel inputs and per-token rows [B, H, 1, T] (in jnp)."""
        xp, dtp, Bp, Cp, _ = reference.pad_to_chunks(x, dt, B, C, segment_ids, q)
        sc = reference.chunk_scalars(dtp, A, seq, q)
        rows = lambda v: v.reshape(b, h, 1, -1)  # noqa: E731
        return (jnp.transpose(xp, (0, 2, 1, 3)), jnp.transpose(Bp, (0, 2, 1, 3)),
                jnp.transpose(Cp, (0, 2, 1, 3)), rows(sc.cum), rows(sc.dt), rows(sc.w_end),
                rows(sc.decay_in), rows(jnp.repeat(sc.gate, q, axis=-1)))

    prepared, prepare_vjp = jax.vjp(prepare, x, dt, A, B, C)
    x_h, B_h, C_h, cum, dts, w_end, decay_in, gate = prepared
    tp = x_h.shape[2]
    nc = tp // q
    dy_h = jnp.transpose(jnp.pad(dy.astype(x.dtype), [(0, 0), (0, tp - t), (0, 0), (0, 0)]),
                         (0, 2, 1, 3))                                     # [B, H, T, P]
    seq_rows = seq.astype(f32).reshape(b, 1, 1, tp)
    init = jnp.zeros((b, h, p, n), f32) if initial_state is None else initial_state.astype(f32)
    D_ = jnp.zeros((h,), f32) if D is None else D.astype(f32)
    params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))

    fwd = lambda bb, hh, c: c  # noqa: E731
    rev = lambda bb, hh, c: nc - 1 - c  # noqa: E731

    def specs(order):
        tokens = lambda width: pl.BlockSpec(  # noqa: E731
            (None, None, q, width), lambda bb, hh, c: (bb, hh, order(bb, hh, c), 0))
        group = pl.BlockSpec((None, None, q, n), lambda bb, hh, c: (bb, hh // rep, order(bb, hh, c), 0))
        row = pl.BlockSpec((None, None, 1, q), lambda bb, hh, c: (bb, hh, 0, order(bb, hh, c)))
        transposed = pl.BlockSpec((None, None, p, q), lambda bb, hh, c: (bb, hh, 0, order(bb, hh, c)))
        chunk_state = pl.BlockSpec((None, None, None, p, n),
                                   lambda bb, hh, c: (bb, hh, order(bb, hh, c), 0, 0))
        return tokens, group, row, transposed, chunk_state

    state_spec = pl.BlockSpec((None, None, p, n), lambda bb, hh, c: (bb, hh, 0, 0))
    _, group, row, transposed, chunk_state = specs(fwd)
    with jax.named_scope(f"ssd_tpu_states_q{q}"):
        s_in = pl.pallas_call(
            _states_kernel, grid=(b, h, nc),
            in_specs=[transposed, group, row, row, state_spec],
            out_specs=chunk_state,
            out_shape=jax.ShapeDtypeStruct((b, h, nc, p, n), f32),
            scratch_shapes=[pltpu.VMEM((p, n), f32)],
            compiler_params=params, interpret=interpret, name=f"ssd_tpu_states_q{q}",
        )(jnp.transpose(x_h, (0, 1, 3, 2)), B_h, w_end, gate, init)

    tokens, group, row, transposed, chunk_state = specs(rev)
    seq_spec = pl.BlockSpec((None, None, 1, q), lambda bb, hh, c: (bb, 0, 0, nc - 1 - c))
    per_head = pl.BlockSpec((None, None, q, n), lambda bb, hh, c: (bb, hh, nc - 1 - c, 0))
    row_out = jax.ShapeDtypeStruct((b, h, 1, tp), f32)
    with jax.named_scope(f"ssd_tpu_bwd_q{q}"):
        dx_h, db_h, dc_h, ddt, dcum, dw_end, ddecay_in, dgate, dinit = pl.pallas_call(
            functools.partial(_bwd_kernel, chunk=q), grid=(b, h, nc),
            in_specs=[tokens(p), tokens(p), transposed, group, group, row, row, seq_spec, row,
                      row, row, chunk_state, pl.BlockSpec(memory_space=pltpu.SMEM), state_spec],
            out_specs=[tokens(p), per_head, per_head, row, row, row, row, row, state_spec],
            out_shape=[jax.ShapeDtypeStruct((b, h, tp, p), x.dtype),
                       jax.ShapeDtypeStruct((b, h, tp, n), f32),
                       jax.ShapeDtypeStruct((b, h, tp, n), f32),
                       row_out, row_out, row_out, row_out, row_out,
                       jax.ShapeDtypeStruct((b, h, p, n), f32)],
            scratch_shapes=[pltpu.VMEM((p, n), f32)],
            compiler_params=params, interpret=interpret, name=f"ssd_tpu_bwd_q{q}",
        )(x_h, dy_h, jnp.transpose(dy_h, (0, 1, 3, 2)), B_h, C_h, cum, dts, seq_rows, w_end,
          decay_in, gate, s_in, D_, dfinal.astype(f32))

    per_group = lambda d, like: d.reshape(b, g, rep, tp, n).sum(2).astype(like.dtype)  # noqa: E731
    dx, ddt_in, dA, dB, dC = prepare_vjp(
        (dx_h, per_group(db_h, B_h), per_group(dc_h, C_h), dcum, ddt, dw_end, ddecay_in, dgate))
    dD = None if D is None else jnp.einsum("bthp,bthp->h", dy.astype(f32), x.astype(f32)).astype(D.dtype)
    return (dx, ddt_in, dA, dB, dC, dD,
            None if initial_state is None else dinit.astype(initial_state.dtype))


api.register_backward("pallas_tpu", ssd_backward)
