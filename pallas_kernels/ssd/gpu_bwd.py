"""The chunked SSD backward for NVIDIA GPUs in Pallas (Triton lowering).

The forward (gpu.py) is chunk_state -> state_passing -> chunk_scan over the per-token
decays of reference.chunk_scalars (cum, dt, w_end, decay_in, gate). The backward runs
the same steps in reverse, as kernels for everything that touches [T, P] or [T, N]
rows, and leaves the O(B T H) decays to jax: their cotangents come out of the kernels,
and `jax.vjp` of the padding and of chunk_scalars carries them to dt and A.

  recompute   local = chunk_state(x, B, w_end); S_in = state_passing(local, gate, init)
              (the forward's kernels; the states are not kept between the passes).
  dS_direct   = sum_t decay_in_t dy_t^T C_t per chunk: the forward's chunk_state kernel
              with (dy, C, decay_in) in place of (x, B, w_end).
  reverse     dlocal[c] = gradient of the state leaving chunk c: the forward's
              state_passing kernel run over the flipped chunk axis (g <- gate g + dS),
              from the final state's cotangent; dgate[c] = <dlocal[c], S_in[c]>.
  rows        grid (batch, chunk, head, row tile t), over s <= t: dC_t (intra-chunk and
              the entering state's part), d decay_in_t, and the cum_t share.
  cols        grid (batch, chunk, head, column tile s), over t >= s: dx_s, dB_s, ddt_s,
              the cum_s share, and chunk_state's backward (dx, dB and dw_end from
              dlocal), plus D dy_s.

In the notation of reference.ssd_chunked, with m_ts = (C_t . B_s) L_ts dt_s and
L_ts = exp(cum_t - cum_s) on kept pairs (s <= t, one segment):

    dm_ts = dy_t . x_s            dx_s += sum_t m_ts dy_t
    dC_t += sum_s dm_ts L_ts dt_s B_s         dB_s += sum_t dm_ts L_ts dt_s C_t
    ddt_s = sum_t dm_ts (C_t . B_s) L_ts      dcum_t += sum_s dm_ts m_ts,  dcum_s -= the same over t

Like flash attention's backward, the rows and the columns are two kernels so that each
accumulates in registers and nothing is added atomically. The heads of one group write
their own dB and dC rows, summed over the group afterwards. Both kernels hold whole
head_dim (P) and d_state (N) rows, since dm and C . B contract over them. Matmul
operands are the inputs' dtype, accumulation f32, as in the forward.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.ssd import api, gpu, reference

f32 = jnp.float32
dot = gpu.plgpu.dot


def _pair_decay(cum_rows, cum_cols, seq_rows, seq_cols, row_idx, col_idx):
    """L [rows, cols] = exp(cum_t - cum_s) where s <= t in one segment, else 0."""
    keep = (row_idx >= col_idx) & (seq_rows == seq_cols)
    return jnp.exp(jnp.where(keep, cum_rows - cum_cols, -jnp.inf))


# ----------------------------------------------------------------------------- rows
def _rows_kernel(c_ref, b_ref, x_ref, dy_ref, cum_ref, dt_ref, seq_ref, din_ref, s_ref,
                 dc_ref, ddin_ref, dcum_ref, *, block_q: int):
    """For one tile of rows t: dC_t, d decay_in_t and sum_s dm_ts m_ts."""
    i = pl.program_id(3)
    rows = pl.ds(i * block_q, block_q)
    c_t, dy_t = c_ref[...], dy_ref[...]                      # [bq, N], [bq, P]
    cum_t = cum_ref[rows][:, None]
    seq_t = seq_ref[rows][:, None]
    t_idx = (i * block_q + jnp.arange(block_q, dtype=jnp.int32))[:, None]
    # The entering state's part: y_t += decay_in_t C_t S_in^T.
    dy_s = dot(dy_t, s_ref[...].astype(dy_t.dtype))          # [bq, N] f32: dy_t S_in
    ddin_ref[...] = jnp.sum(dy_s * c_t.astype(f32), axis=1)
    dc = dy_s * din_ref[rows][:, None]

    def body(j, carry):
        dc, dcum = carry
        cols = pl.ds(j * block_q, block_q)
        b_s = b_ref[cols, :]
        s_idx = (j * block_q + jnp.arange(block_q, dtype=jnp.int32))[None, :]
        L = _pair_decay(cum_t, cum_ref[cols][None, :], seq_t, seq_ref[cols][None, :], t_idx, s_idx)
        dm = dot(dy_t, x_ref[cols, :], trans_b=True)         # [bq, bq]
        dcb = dm * L * dt_ref[cols][None, :]
        cb = dot(c_t, b_s, trans_b=True)
        return dc + dot(dcb.astype(b_s.dtype), b_s), dcum + jnp.sum(dcb * cb, axis=1)

    dc, dcum = jax.lax.fori_loop(0, i + 1, body, (dc, jnp.zeros((block_q,), f32)))
    dc_ref[...] = dc
    dcum_ref[...] = dcum


def _rows(x, dy, B, C, sc: reference.ChunkScalars, s_in, *, chunk, rep, blocks, interpret):
    b, t, h, p = x.shape
    n = B.shape[-1]
    nc, bq = t // chunk, blocks.block_q
    tiles = chunk // bq
    name = f"ssd_bwd_rows_q{chunk}_bq{bq}"
    in_chunk = lambda bb, c, hh, i: (bb, hh, c)
    row_vec = pl.BlockSpec((None, None, bq), lambda bb, c, hh, i: (bb, hh, c * tiles + i))
    with jax.named_scope(name):
        return pl.pallas_call(
            functools.partial(_rows_kernel, block_q=bq),
            grid=(b, nc, h, tiles),
            in_specs=[
                pl.BlockSpec((None, bq, None, n), lambda bb, c, hh, i: (bb, c * tiles + i, hh // rep, 0)),
                pl.BlockSpec((None, chunk, None, n), lambda bb, c, hh, i: (bb, c, hh // rep, 0)),
                pl.BlockSpec((None, chunk, None, p), lambda bb, c, hh, i: (bb, c, hh, 0)),
                pl.BlockSpec((None, bq, None, p), lambda bb, c, hh, i: (bb, c * tiles + i, hh, 0)),
                pl.BlockSpec((None, None, chunk), in_chunk),                          # cum
                pl.BlockSpec((None, None, chunk), in_chunk),                          # dt
                pl.BlockSpec((None, chunk), lambda bb, c, hh, i: (bb, c)),            # seq
                pl.BlockSpec((None, None, chunk), in_chunk),                          # decay_in
                pl.BlockSpec((None, None, None, p, n), lambda bb, c, hh, i: (bb, c, hh, 0, 0)),
            ],
            out_specs=[pl.BlockSpec((None, bq, None, n), lambda bb, c, hh, i: (bb, c * tiles + i, hh, 0)),
                       row_vec, row_vec],
            out_shape=[jax.ShapeDtypeStruct((b, t, h, n), f32),
                       jax.ShapeDtypeStruct((b, h, t), f32),
                       jax.ShapeDtypeStruct((b, h, t), f32)],
            compiler_params=gpu._params(blocks), interpret=interpret, name=name,
        )(C, B, x, dy, sc.cum, sc.dt, sc.seq, sc.decay_in, s_in)


# ----------------------------------------------------------------------------- cols
def _cols_kernel(x_ref, b_ref, c_ref, dy_ref, cum_ref, dt_ref, seq_ref, w_ref, dl_ref, d_ref,
                 dx_ref, db_ref, ddt_ref, dcum_ref, dw_ref, *, block_q: int, tiles: int):
    """For one tile of columns s: dx_s, dB_s, ddt_s, the cum_s share and dw_end_s."""
    j = pl.program_id(3)
    cols = pl.ds(j * block_q, block_q)
    x_s, b_s = x_ref[...], b_ref[...]                        # [bq, P], [bq, N]
    cum_s = cum_ref[cols][:, None]
    seq_s = seq_ref[cols][:, None]
    dt_s = dt_ref[cols][:, None]
    s_idx = (j * block_q + jnp.arange(block_q, dtype=jnp.int32))[:, None]

    def body(i, carry):
        dx, db, ddt = carry
        rows = pl.ds(i * block_q, block_q)
        c_t, dy_t = c_ref[rows, :], dy_ref[rows, :]
        t_idx = (i * block_q + jnp.arange(block_q, dtype=jnp.int32))[None, :]
        # Transposed pairs [s, t] (L^T), so the sums over t run along the rows' axis 1.
        L = _pair_decay(cum_ref[rows][None, :], cum_s, seq_ref[rows][None, :], seq_s, t_idx, s_idx)
        cbl = dot(b_s, c_t, trans_b=True) * L                # (C_t . B_s) L_ts
        dm = dot(x_s, dy_t, trans_b=True)                    # dy_t . x_s
        dx = dx + dot((cbl * dt_s).astype(dy_t.dtype), dy_t)
        db = db + dot((dm * L * dt_s).astype(c_t.dtype), c_t)
        return dx, db, ddt + jnp.sum(dm * cbl, axis=1)

    zeros = lambda *shape: jnp.zeros(shape, f32)
    dx, db, ddt = jax.lax.fori_loop(j, tiles, body, (zeros(*x_s.shape), zeros(*b_s.shape),
                                                      zeros(block_q)))
    ddt_ref[...] = ddt
    dcum_ref[...] = -dt_s[:, 0] * ddt                        # m_ts = ... dt_s, so dm m sums to dt_s ddt_s
    # chunk_state's backward: local = sum_s w_s x_s^T B_s.
    dlocal = dl_ref[...]                                     # [P, N] f32
    w_s = w_ref[cols][:, None]
    u = dot(b_s, dlocal.astype(b_s.dtype), trans_b=True)     # [bq, P]: B_s dlocal^T
    dw_ref[...] = jnp.sum(x_s.astype(f32) * u, axis=1)
    dx = dx + w_s * u + d_ref[0] * dy_ref[cols, :].astype(f32)
    db = db + w_s * dot(x_s, dlocal.astype(x_s.dtype))
    dx_ref[...] = dx.astype(dx_ref.dtype)
    db_ref[...] = db


def _cols(x, dy, B, C, sc: reference.ChunkScalars, dlocal, D, *, chunk, rep, blocks, interpret):
    b, t, h, p = x.shape
    n = B.shape[-1]
    nc, bq = t // chunk, blocks.block_q
    tiles = chunk // bq
    name = f"ssd_bwd_cols_q{chunk}_bq{bq}"
    in_chunk = lambda bb, c, hh, j: (bb, hh, c)
    col_vec = pl.BlockSpec((None, None, bq), lambda bb, c, hh, j: (bb, hh, c * tiles + j))
    with jax.named_scope(name):
        return pl.pallas_call(
            functools.partial(_cols_kernel, block_q=bq, tiles=tiles),
            grid=(b, nc, h, tiles),
            in_specs=[
                pl.BlockSpec((None, bq, None, p), lambda bb, c, hh, j: (bb, c * tiles + j, hh, 0)),
                pl.BlockSpec((None, bq, None, n), lambda bb, c, hh, j: (bb, c * tiles + j, hh // rep, 0)),
                pl.BlockSpec((None, chunk, None, n), lambda bb, c, hh, j: (bb, c, hh // rep, 0)),
                pl.BlockSpec((None, chunk, None, p), lambda bb, c, hh, j: (bb, c, hh, 0)),
                pl.BlockSpec((None, None, chunk), in_chunk),                          # cum
                pl.BlockSpec((None, None, chunk), in_chunk),                          # dt
                pl.BlockSpec((None, chunk), lambda bb, c, hh, j: (bb, c)),            # seq
                pl.BlockSpec((None, None, chunk), in_chunk),                          # w_end
                pl.BlockSpec((None, None, None, p, n), lambda bb, c, hh, j: (bb, c, hh, 0, 0)),
                pl.BlockSpec((1,), lambda bb, c, hh, j: (hh,)),                       # D
            ],
            out_specs=[pl.BlockSpec((None, bq, None, p), lambda bb, c, hh, j: (bb, c * tiles + j, hh, 0)),
                       pl.BlockSpec((None, bq, None, n), lambda bb, c, hh, j: (bb, c * tiles + j, hh, 0)),
                       col_vec, col_vec, col_vec],
            out_shape=[jax.ShapeDtypeStruct((b, t, h, p), x.dtype),
                       jax.ShapeDtypeStruct((b, t, h, n), f32),
                       jax.ShapeDtypeStruct((b, h, t), f32),
                       jax.ShapeDtypeStruct((b, h, t), f32),
                       jax.ShapeDtypeStruct((b, h, t), f32)],
            compiler_params=gpu._params(blocks), interpret=interpret, name=name,
        )(x, B, C, dy, sc.cum, sc.dt, sc.seq, sc.w_end, dlocal, D)


# ----------------------------------------------------------------------------- backward
def ssd_backward(x, dt, A, B, C, D, segment_ids, initial_state, dy, dfinal, *, chunk_size: int,
                 block_sizes=None, interpret=None):
    """Cotangents (dx, ddt, dA, dB, dC, dD, d initial_state) of gpu.ssd_forward's outputs.

    dD and d initial_state are None where D or initial_state is None.
    """
    setup = gpu.setup(x, B, chunk_size, block_sizes, interpret)
    b, t, h, p = x.shape
    g, n = B.shape[2:]
    rep, q = h // g, chunk_size
    p_pad, n_pad, blocks = setup.p_pad, setup.n_pad, setup.blocks
    seq = reference.padded_seq_index(segment_ids, b, t, q)  # an int: outside the vjp

    def prepare(x, dt, A, B, C, init):
        """The kernels' inputs from the caller's: padding and the chunk decays (in jnp)."""
        xp, dtp, Bp, Cp, _ = reference.pad_to_chunks(x, dt, B, C, segment_ids, q)
        sc = reference.chunk_scalars(dtp, A, seq, q)
        xp, Bp, Cp = gpu.pad_last(xp, p_pad), gpu.pad_last(Bp, n_pad), gpu.pad_last(Cp, n_pad)
        init = jnp.pad(init, [(0, 0), (0, 0), (0, p_pad - p), (0, n_pad - n)])
        return xp, Bp, Cp, sc.cum, sc.dt, sc.w_end, sc.decay_in, sc.gate, init

    init = jnp.zeros((b, h, p, n), f32) if initial_state is None else initial_state.astype(f32)
    prepared, prepare_vjp = jax.vjp(prepare, x, dt, A, B, C, init)
    xp, Bp, Cp, cum, dts, w_end, decay_in, gate, init_p = prepared
    sc = reference.ChunkScalars(cum, dts, seq, w_end, decay_in, gate)
    t_pad = xp.shape[1]
    dyp = gpu.pad_last(jnp.pad(dy.astype(x.dtype), [(0, 0), (0, t_pad - t), (0, 0), (0, 0)]), p_pad)
    dfinal = jnp.pad(dfinal.astype(f32), [(0, 0), (0, 0), (0, p_pad - p), (0, n_pad - n)])
    D_ = jnp.zeros((h,), f32) if D is None else D.astype(f32)
    kw = dict(blocks=blocks, interpret=setup.interpret)

    local = gpu._chunk_state(xp, Bp, w_end, chunk=q, rep=rep, **kw)
    s_in, _ = gpu._state_passing(local, gate, init_p, **kw)
    ds_direct = gpu._chunk_state(dyp, Cp, decay_in, chunk=q, rep=rep, **kw)
    dl_flipped, dinit = gpu._state_passing(jnp.flip(ds_direct, 1), jnp.flip(gate, -1), dfinal, **kw)
    dlocal = jnp.flip(dl_flipped, 1)                                   # [B, nc, H, P, N]
    dgate = jnp.moveaxis(jnp.sum(dlocal * s_in, axis=(-2, -1)), 1, 2)  # [B, H, nc]

    dc_h, ddecay_in, dcum_rows = _rows(xp, dyp, Bp, Cp, sc, s_in, chunk=q, rep=rep, **kw)
    dxp, db_h, ddt, dcum_cols, dw_end = _cols(xp, dyp, Bp, Cp, sc, dlocal, D_, chunk=q, rep=rep,
                                              **kw)
    per_group = lambda d, like: d.reshape(b, t_pad, g, rep, n_pad).sum(3).astype(like.dtype)
    dx, ddt_in, dA, dB, dC, dinit = prepare_vjp(
        (dxp, per_group(db_h, Bp), per_group(dc_h, Cp), dcum_rows + dcum_cols, ddt, dw_end,
         ddecay_in, dgate, dinit))
    dD = None if D is None else jnp.einsum("bthp,bthp->h", dy.astype(f32), x.astype(f32)).astype(D.dtype)
    return (dx, ddt_in, dA, dB, dC, dD,
            None if initial_state is None else dinit.astype(initial_state.dtype))


api.register_backward("pallas_gpu", ssd_backward)
