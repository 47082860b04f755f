"""The chunked SSD forward for TPUs in Pallas (Mosaic lowering): one kernel.

A TPU core runs the grid in order, so the chunk axis can be the innermost, sequential
("arbitrary") grid axis and the state can live in VMEM scratch across it, as the flash
kernel's online softmax does across key blocks. One kernel, grid (batch, head, chunk),
does all four steps of reference.ssd_chunked for one chunk per step:

    y      = (C B^T * exp(cum_t - cum_s) * dt_s) x    masked to s <= t, same segment
           + exp(cum_t) C S^T                          the state entering the chunk
           + D x
    S     <- gate S + (x w_end)^T B                    the state leaving it

so the states never go to HBM (the GPU kernels write them out to parallelise over
chunks; a TPU has one or two cores and gets its parallelism from batch x heads). The
segment masks come from the running boundary count `seq` (reference.seq_index), kept as
f32 rows; the previous chunk's last value sits in a small VMEM scratch.

Layout inside: head-major [B, H, T, P] (a block is a (tokens, head_dim) matrix for the
MXU), x also transposed [B, H, P, T] for the state update (an NN matmul: no in-kernel
transpose), per-token rows [B, H, 1, T] (tokens on lanes). Columns that a (Q, Q) tile
needs (cum_t, seq_t) are taken out of the rows by a masked lane reduction with the
identity, which Mosaic lowers without a transpose. Compiled on a TPU, chunk_size must be
a multiple of 128 (the lanes of those rows); interpret mode (off TPU,
`pltpu.InterpretParams()`) takes any multiple of 8.

    import jax, jax.numpy as jnp
    from pallas_kernels.ssd import tpu
    x = jnp.ones((1, 100, 4, 32)); dt = jnp.full((1, 100, 4), 0.1)
    B = C = jnp.ones((1, 100, 1, 16)); A = -jnp.ones((4,))
    y, state = tpu.ssd_forward(x, dt, A, B, C, None, None, None, chunk_size=32)

No gradient here: the backward kernels are in tpu_bwd.py. Not yet run compiled on a TPU.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ssd import api, reference

f32 = jnp.float32
NUM_LANES = 128
_NN = (((1,), (0,)), ((), ()))  # a @ b
_NT = (((1,), (1,)), ((), ()))  # a @ b.T


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """The TPU kernel has one tile, the chunk (model.ssm.chunk_size); nothing to set yet.

    Kept so that every backend takes `block_sizes=` of its own class.
    """


def _default_interpret():
    return False if jax.default_backend() == "tpu" else pltpu.InterpretParams()


def _column(row, eye):
    """A [1, Q] row as a [Q, 1] column: sum over lanes of where(eye, row, 0)."""
    return jnp.sum(jnp.where(eye, row, 0.0), axis=1, keepdims=True)


def _last(row, lane):
    """The last entry of a [1, Q] row, as [1, 1]."""
    return jnp.sum(jnp.where(lane == row.shape[1] - 1, row, 0.0), axis=1, keepdims=True)


def _ssd_kernel(x_ref, xt_ref, b_ref, c_ref, cum_ref, dt_ref, seq_ref, d_ref, init_ref,
                y_ref, final_ref, state_ref, prev_ref, *, chunk: int):
    hh, c = pl.program_id(1), pl.program_id(2)
    seq = seq_ref[...]                                 # [1, Q] f32 boundary count

    @pl.when(c == 0)
    def _():
        state_ref[...] = init_ref[...]
        # The initial state belongs to token 0's segment.
        first = jnp.sum(jnp.where(lax.broadcasted_iota(jnp.int32, seq.shape, 1) == 0, seq, 0.0),
                        axis=1, keepdims=True)
        prev_ref[...] = jnp.broadcast_to(first, prev_ref.shape)

    t_idx = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    s_idx = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    eye = t_idx == s_idx
    lane = lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
    cum, dt = cum_ref[...], dt_ref[...]                # [1, Q]
    cum_t, seq_t = _column(cum, eye), _column(seq, eye)  # [Q, 1]
    seq_prev = prev_ref[:, :1]                         # [1, 1]
    x, bmat, cmat = x_ref[...], b_ref[...], c_ref[...]  # [Q, P], [Q, N], [Q, N]

    # Inside the chunk: a causal, segment-masked quadratic form.
    keep = (t_idx >= s_idx) & (seq_t == seq)
    decay = jnp.exp(jnp.where(keep, cum_t - cum, -jnp.inf))              # [Q, Q]
    cb = lax.dot_general(cmat, bmat, _NT, preferred_element_type=f32)    # [Q, Q]
    m = (cb * decay * dt).astype(x.dtype)
    y = lax.dot_general(m, x, _NN, preferred_element_type=f32)           # [Q, P]
    # The state entering the chunk.
    s = state_ref[...]                                                    # [P, N] f32
    decay_in = jnp.exp(jnp.where(seq_t == seq_prev, cum_t, -jnp.inf))    # [Q, 1]
    y = y + lax.dot_general(cmat, s.astype(cmat.dtype), _NT, preferred_element_type=f32) * decay_in
    y = y + d_ref[hh] * x.astype(f32)
    y_ref[...] = y.astype(y_ref.dtype)

    # The state leaving the chunk.
    cum_last, seq_last = _last(cum, lane), _last(seq, lane)              # [1, 1]
    w_end = dt * jnp.exp(jnp.where(seq == seq_last, cum_last - cum, -jnp.inf))  # [1, Q]
    gate = jnp.exp(jnp.where(seq_last == seq_prev, cum_last, -jnp.inf))  # [1, 1]
    xw = (xt_ref[...].astype(f32) * w_end).astype(bmat.dtype)            # [P, Q]
    s = gate * s + lax.dot_general(xw, bmat, _NN, preferred_element_type=f32)
    state_ref[...] = s
    prev_ref[...] = jnp.broadcast_to(seq_last, prev_ref.shape)

    @pl.when(c == pl.num_programs(2) - 1)
    def _():
        final_ref[...] = s


def ssd_forward(x, dt, A, B, C, D, segment_ids, initial_state, *, chunk_size: int,
                block_sizes: BlockSizes | None = None, interpret=None):
    """(y [B, T, H, P], final state [B, H, P, N] f32) by one TPU kernel; no gradient."""
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes must be a tpu.BlockSizes or None, got {block_sizes!r}")
    interpret = _default_interpret() if interpret is None else interpret
    if chunk_size % 8:
        raise NotImplementedError(f"the Pallas TPU kernel needs {chunk_size=} to be a multiple of 8")
    if not interpret and chunk_size % NUM_LANES:
        raise NotImplementedError(f"compiled on a TPU, {chunk_size=} must be a multiple of "
                                  f"{NUM_LANES} (the kernel keeps per-token rows on lanes)")
    b, t, h, p = x.shape
    g, n = B.shape[2:]
    rep, q = h // g, chunk_size
    xp, dtp, Bp, Cp, seq = reference.pad_to_chunks(x, dt, B, C, segment_ids, q)
    tp = xp.shape[1]
    nc = tp // q
    sc = reference.chunk_scalars(dtp, A, seq, q)
    x_h = jnp.transpose(xp, (0, 2, 1, 3))                  # [B, H, T, P]
    x_t = jnp.transpose(xp, (0, 2, 3, 1))                  # [B, H, P, T]
    B_h = jnp.transpose(Bp, (0, 2, 1, 3))                  # [B, G, T, N]
    C_h = jnp.transpose(Cp, (0, 2, 1, 3))
    rows = lambda v: v.reshape(b, h, 1, tp)                # [B, H, 1, T] tokens on lanes
    seq_rows = sc.seq.astype(f32).reshape(b, 1, 1, tp)
    init = jnp.zeros((b, h, p, n), f32) if initial_state is None else initial_state.astype(f32)
    D = jnp.zeros((h,), f32) if D is None else D.astype(f32)
    row_spec = pl.BlockSpec((None, None, 1, q), lambda bb, hh, c: (bb, hh, 0, c))
    state_spec = pl.BlockSpec((None, None, p, n), lambda bb, hh, c: (bb, hh, 0, 0))
    name = f"ssd_tpu_q{q}"
    with jax.named_scope(name):
        y, final = pl.pallas_call(
            functools.partial(_ssd_kernel, chunk=q),
            grid=(b, h, nc),
            in_specs=[
                pl.BlockSpec((None, None, q, p), lambda bb, hh, c: (bb, hh, c, 0)),      # x
                pl.BlockSpec((None, None, p, q), lambda bb, hh, c: (bb, hh, 0, c)),      # x^T
                pl.BlockSpec((None, None, q, n), lambda bb, hh, c: (bb, hh // rep, c, 0)),  # B
                pl.BlockSpec((None, None, q, n), lambda bb, hh, c: (bb, hh // rep, c, 0)),  # C
                row_spec, row_spec,                                                        # cum, dt
                pl.BlockSpec((None, None, 1, q), lambda bb, hh, c: (bb, 0, 0, c)),       # seq
                pl.BlockSpec(memory_space=pltpu.SMEM),                                    # D
                state_spec,                                                                # init
            ],
            out_specs=[pl.BlockSpec((None, None, q, p), lambda bb, hh, c: (bb, hh, c, 0)),
                       state_spec],
            out_shape=[jax.ShapeDtypeStruct((b, h, tp, p), x.dtype),
                       jax.ShapeDtypeStruct((b, h, p, n), f32)],
            scratch_shapes=[pltpu.VMEM((p, n), f32),              # the state
                            pltpu.VMEM((1, NUM_LANES), f32)],     # seq of the previous chunk's end
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "arbitrary")),
            interpret=interpret, name=name,
        )(x_h, x_t, B_h, C_h, rows(sc.cum), rows(sc.dt), seq_rows, D, init)
    return jnp.transpose(y, (0, 2, 1, 3))[:, :t], final


api.register_backend("pallas_tpu", ssd_forward)
