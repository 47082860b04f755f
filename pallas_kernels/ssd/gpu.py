"""The chunked SSD forward for NVIDIA GPUs in Pallas (Triton lowering).

Mamba-2's own GPU decomposition (state-spaces/mamba, ops/triton/ssd_*.py), with the
steps of reference.ssd_chunked as three kernels, so that the work that is parallel
over chunks runs parallel over chunks:

  chunk_state    grid (batch, chunk, head, P-tile, N-tile): each chunk's contribution
                 to the state at its end, local_c = (x * w_end)^T B  ([P, N] per chunk).
  state_passing  grid (batch, head, P-tile, N-tile): the only sequential step, over
                 chunks: S_in[c] = state entering chunk c; S <- gate_c S + local_c.
  chunk_scan     grid (batch, chunk, head, row-tile, P-tile): the outputs. Like a
                 causal flash-attention tile loop inside the chunk: for each tile of
                 rows t it adds (C_t B_s^T * exp(cum_t - cum_s) * dt_s) x_s over the
                 tiles s <= t, plus the entering state's share exp(cum_t) C_t S_in^T,
                 plus D x_t.

The per-token decays (cumsums of dt * A inside chunks, the segment masks folded into
w_end / decay_in / gate) are O(B T H) elementwise work, computed in jnp beforehand
(reference.chunk_scalars), as Mamba-2's `chunk_cumsum` kernel does. States are f32;
matmul operands are the inputs' dtype (bf16 in training) with f32 accumulation.

    import jax, jax.numpy as jnp
    from pallas_kernels.ssd import gpu
    x = jnp.ones((1, 100, 4, 32)); dt = jnp.full((1, 100, 4), 0.1)
    B = C = jnp.ones((1, 100, 1, 16)); A = -jnp.ones((4,))
    y, state = gpu.ssd_forward(x, dt, A, B, C, None, None, None, chunk_size=32)  # interpret on CPU

Layout: BTHD as everywhere; per-token scalars [B, H, T]. The sequence is padded to whole
chunks, head_dim and d_state to powers of two >= 16 (Triton tiles are powers of two;
zero columns change nothing). No gradient here: the backward kernels are in gpu_bwd.py.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.ssd import api, reference

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles and Triton launch parameters (they change speed, not results).

    Attributes:
      block_q: rows per tile inside a chunk (chunk_scan's output rows and inner steps,
        chunk_state's steps over the chunk).
      block_p: head_dim (P) columns per program of chunk_state, state_passing, chunk_scan.
      block_n: d_state (N) columns per program of chunk_state and state_passing
        (chunk_scan reads the whole state row).
      num_warps, num_stages: Triton launch of every kernel.
    Blocks are powers of two >= 16 (Triton's dot); one longer than its dimension
    shrinks to it.
    """

    block_q: int = 64
    block_p: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_p", "block_n"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ValueError(f"BlockSizes.{name}={value!r} must be a power of two >= 16")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"BlockSizes.num_warps={self.num_warps!r} must be one of 1, 2, 4, 8, 16")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"BlockSizes.num_stages={self.num_stages!r} must be a positive int")

    def fit(self, chunk: int, p: int, n: int) -> "BlockSizes":
        return dataclasses.replace(self, block_q=min(self.block_q, chunk),
                                   block_p=min(self.block_p, p), block_n=min(self.block_n, n))


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _params(blocks: BlockSizes):
    return plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


# ----------------------------------------------------------------------------- chunk_state
def _chunk_state_kernel(x_ref, b_ref, w_ref, out_ref, *, chunk: int, block_q: int):
    """local = sum_s (x_s w_s)^T B_s over the chunk: [block_p, block_n] f32."""
    def body(j, acc):
        rows = pl.ds(j * block_q, block_q)
        x = x_ref[rows, :]                                   # [bq, bp]
        bmat = b_ref[rows, :]                                # [bq, bn]
        xw = (x.astype(f32) * w_ref[rows][:, None]).astype(x.dtype)
        return acc + plgpu.dot(xw, bmat, trans_a=True)       # [bp, bn]

    acc = jnp.zeros(out_ref.shape, f32)
    out_ref[...] = jax.lax.fori_loop(0, chunk // block_q, body, acc)


def _chunk_state(x, B, w_end, *, chunk, rep, blocks: BlockSizes, interpret):
    b, t, h, p = x.shape
    n = B.shape[-1]
    nc, bp, bn = t // chunk, blocks.block_p, blocks.block_n
    name = f"ssd_chunk_state_q{chunk}_p{bp}_n{bn}"
    with jax.named_scope(name):
        return pl.pallas_call(
            functools.partial(_chunk_state_kernel, chunk=chunk, block_q=blocks.block_q),
            grid=(b, nc, h, p // bp, n // bn),
            in_specs=[
                pl.BlockSpec((None, chunk, None, bp), lambda bb, c, hh, i, j: (bb, c, hh, i)),
                # Group hh // rep's B, read straight from memory (no repeat over heads).
                pl.BlockSpec((None, chunk, None, bn), lambda bb, c, hh, i, j: (bb, c, hh // rep, j)),
                pl.BlockSpec((None, None, chunk), lambda bb, c, hh, i, j: (bb, hh, c)),
            ],
            out_specs=pl.BlockSpec((None, None, None, bp, bn),
                                   lambda bb, c, hh, i, j: (bb, c, hh, i, j)),
            out_shape=jax.ShapeDtypeStruct((b, nc, h, p, n), f32),
            compiler_params=_params(blocks), interpret=interpret, name=name,
        )(x, B, w_end)


# ----------------------------------------------------------------------------- state_passing
def _state_passing_kernel(local_ref, gate_ref, init_ref, s_in_ref, final_ref, *, num_chunks: int):
    """S_in[c] = S; S <- gate[c] S + local[c], over the chunks in order."""
    def body(c, s):
        s_in_ref[c, :, :] = s
        return gate_ref[c] * s + local_ref[c, :, :]

    final_ref[...] = jax.lax.fori_loop(0, num_chunks, body, init_ref[...])


def _state_passing(local, gate, init, *, blocks: BlockSizes, interpret):
    b, nc, h, p, n = local.shape
    bp, bn = blocks.block_p, blocks.block_n
    name = f"ssd_state_passing_p{bp}_n{bn}"
    with jax.named_scope(name):
        return pl.pallas_call(
            functools.partial(_state_passing_kernel, num_chunks=nc),
            grid=(b, h, p // bp, n // bn),
            in_specs=[
                pl.BlockSpec((None, nc, None, bp, bn), lambda bb, hh, i, j: (bb, 0, hh, i, j)),
                pl.BlockSpec((None, None, nc), lambda bb, hh, i, j: (bb, hh, 0)),
                pl.BlockSpec((None, None, bp, bn), lambda bb, hh, i, j: (bb, hh, i, j)),
            ],
            out_specs=[pl.BlockSpec((None, nc, None, bp, bn), lambda bb, hh, i, j: (bb, 0, hh, i, j)),
                       pl.BlockSpec((None, None, bp, bn), lambda bb, hh, i, j: (bb, hh, i, j))],
            out_shape=[jax.ShapeDtypeStruct((b, nc, h, p, n), f32),
                       jax.ShapeDtypeStruct((b, h, p, n), f32)],
            compiler_params=_params(blocks), interpret=interpret, name=name,
        )(local, gate, init)


# ----------------------------------------------------------------------------- chunk_scan
def _chunk_scan_kernel(c_ref, b_ref, x_ref, cum_ref, dt_ref, seq_ref, din_ref, s_ref, d_ref,
                       y_ref, *, block_q: int):
    """y rows of one tile: intra-chunk quadratic part + the entering state's part + D x."""
    i = pl.program_id(3)  # row tile inside the chunk (read outside the loop)
    rows = pl.ds(i * block_q, block_q)
    c_t = c_ref[...]                                          # [bq, N]
    cum_t = cum_ref[rows][:, None]                            # [bq, 1]
    seq_t = seq_ref[rows][:, None]
    t_idx = (i * block_q + jnp.arange(block_q, dtype=jnp.int32))[:, None]
    # The state entering the chunk, read out by C and decayed to each row.
    s_in = s_ref[...]                                         # [bp, N] f32
    acc = plgpu.dot(c_t, s_in.astype(c_t.dtype), trans_b=True) * din_ref[rows][:, None]

    def body(j, acc):
        cols = pl.ds(j * block_q, block_q)
        cb = plgpu.dot(c_t, b_ref[cols, :], trans_b=True)     # [bq, bq] f32
        s_idx = (j * block_q + jnp.arange(block_q, dtype=jnp.int32))[None, :]
        keep = (t_idx >= s_idx) & (seq_t == seq_ref[cols][None, :])
        decay = jnp.exp(jnp.where(keep, cum_t - cum_ref[cols][None, :], -jnp.inf))
        m = cb * decay * dt_ref[cols][None, :]
        x_s = x_ref[cols, :]                                  # [bq, bp]
        return acc + plgpu.dot(m.astype(x_s.dtype), x_s)

    acc = jax.lax.fori_loop(0, i + 1, body, acc)
    acc = acc + d_ref[0] * x_ref[rows, :].astype(f32)
    y_ref[...] = acc.astype(y_ref.dtype)


def _chunk_scan(x, B, C, sc: reference.ChunkScalars, s_in, D, *, chunk, rep, blocks: BlockSizes,
                interpret):
    b, t, h, p = x.shape
    n = B.shape[-1]
    nc, bq, bp = t // chunk, blocks.block_q, blocks.block_p
    tiles = chunk // bq
    name = f"ssd_chunk_scan_q{chunk}_bq{bq}_p{bp}"
    row_tile = lambda bb, c, hh, i, j: (bb, c * tiles + i, hh // rep, 0)
    in_chunk = lambda bb, c, hh, i, j: (bb, hh, c)
    with jax.named_scope(name):
        return pl.pallas_call(
            functools.partial(_chunk_scan_kernel, block_q=bq),
            grid=(b, nc, h, tiles, p // bp),
            in_specs=[
                pl.BlockSpec((None, bq, None, n), row_tile),                                  # C rows
                pl.BlockSpec((None, chunk, None, n), lambda bb, c, hh, i, j: (bb, c, hh // rep, 0)),  # B
                pl.BlockSpec((None, chunk, None, bp), lambda bb, c, hh, i, j: (bb, c, hh, j)),  # x
                pl.BlockSpec((None, None, chunk), in_chunk),                                  # cum
                pl.BlockSpec((None, None, chunk), in_chunk),                                  # dt
                pl.BlockSpec((None, chunk), lambda bb, c, hh, i, j: (bb, c)),                 # seq
                pl.BlockSpec((None, None, chunk), in_chunk),                                  # decay_in
                pl.BlockSpec((None, None, None, bp, n), lambda bb, c, hh, i, j: (bb, c, hh, j, 0)),  # S_in
                pl.BlockSpec((1,), lambda bb, c, hh, i, j: (hh,)),                            # D
            ],
            out_specs=pl.BlockSpec((None, bq, None, bp), lambda bb, c, hh, i, j: (bb, c * tiles + i, hh, j)),
            out_shape=jax.ShapeDtypeStruct((b, t, h, p), x.dtype),
            compiler_params=_params(blocks), interpret=interpret, name=name,
        )(C, B, x, sc.cum, sc.dt, sc.seq, sc.decay_in, s_in, D)


# ----------------------------------------------------------------------------- forward
class Setup(NamedTuple):
    p_pad: int          # head_dim padded to a power of two >= 16
    n_pad: int          # d_state, the same
    blocks: BlockSizes  # the tiles, fitted to the chunk and the padded dims
    interpret: bool


def setup(x, B, chunk_size: int, block_sizes, interpret) -> Setup:
    """Checks (NotImplementedError for what the tiles cannot take), padding and tiles."""
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes must be a gpu.BlockSizes or None, got {block_sizes!r}")
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise NotImplementedError(f"the Pallas GPU kernel needs a power-of-two {chunk_size=} >= 16")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    p, n = x.shape[-1], B.shape[-1]
    p_pad, n_pad = _next_pow2(max(p, 16)), _next_pow2(max(n, 16))
    if n_pad > 256 or p_pad > 256:
        raise NotImplementedError(f"head_dim={p} and d_state={n} must be <= 256 for the GPU tiles")
    blocks = (block_sizes or BlockSizes()).fit(chunk_size, p_pad, n_pad)
    return Setup(p_pad, n_pad, blocks, bool(interpret))


def pad_last(a, to: int):
    """Zero-pad the last axis to `to` (zero columns change no product)."""
    return jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, to - a.shape[-1])])


def ssd_forward(x, dt, A, B, C, D, segment_ids, initial_state, *, chunk_size: int,
                block_sizes: BlockSizes | None = None, interpret=None):
    """(y [B, T, H, P], final state [B, H, P, N] f32) by the three kernels; no gradient."""
    p_pad, n_pad, blocks, interpret = setup(x, B, chunk_size, block_sizes, interpret)
    b, t, h, p = x.shape
    g, n = B.shape[2:]
    rep = h // g
    xp, dtp, Bp, Cp, seq = reference.pad_to_chunks(x, dt, B, C, segment_ids, chunk_size)
    sc = reference.chunk_scalars(dtp, A, seq, chunk_size)
    xp, Bp, Cp = pad_last(xp, p_pad), pad_last(Bp, n_pad), pad_last(Cp, n_pad)
    init = jnp.zeros((b, h, p_pad, n_pad), f32) if initial_state is None else jnp.pad(
        initial_state.astype(f32), [(0, 0), (0, 0), (0, p_pad - p), (0, n_pad - n)])
    D = jnp.zeros((h,), f32) if D is None else D.astype(f32)
    kw = dict(blocks=blocks, interpret=interpret)
    local = _chunk_state(xp, Bp, sc.w_end, chunk=chunk_size, rep=rep, **kw)
    s_in, final = _state_passing(local, sc.gate, init, **kw)
    y = _chunk_scan(xp, Bp, Cp, sc, s_in, D, chunk=chunk_size, rep=rep, **kw)
    return y[:, :t, :, :p], final[:, :, :p, :n]


api.register_backend("pallas_gpu", ssd_forward)
