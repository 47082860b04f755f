"""SSD, Mamba-2's state space layer, in plain jnp: the recurrence and the chunked form.

Dao & Gu 2024, "Transformers are SSMs" (arXiv:2405.21060). Per head h, with a scalar
decay a_t = dt_t * A_h (A_h < 0) and the head's group g = h // (H / G) of B and C:

    state_t = exp(a_t) * state_{t-1} + dt_t * x_t B_t^T        # [P, N]
    y_t     = state_t C_t + D_h * x_t                           # [P]

`ssd_recurrence` runs exactly this, one token at a time (`lax.scan`): it defines the
semantics. `ssd_chunked` computes the same thing as the paper's SSD algorithm
(§6, Listing 1; state-spaces/mamba `ssd_minimal_discrete`): the sequence is cut into
chunks of Q tokens, and

  1. inside a chunk, y is a masked quadratic form, like causal attention:
     y_t = sum_{s <= t} (C_t . B_s) exp(cum_t - cum_s) dt_s x_s     (cum: cumsum of a)
  2. each chunk's own contribution to the state at its end (a matmul over its tokens),
  3. the states are passed from chunk to chunk (a scan over chunks, not tokens),
  4. the state entering a chunk reaches its tokens through C: y_t += exp(cum_t) C_t S_in.

Packed documents: `segment_ids [B, T]` (train.py's batches; 0 = padding) cut the
recurrence. Where the segment changes (seg_t != seg_{t-1}) the state is reset before
token t is added, so no document sees another's tokens. The chunked form masks the
decays instead: a pair (t, s) only interacts when no boundary lies between them,
tested with `seq_index` (a running count of boundaries). An `initial_state` (a decode
cache) flows into token 0 and so belongs to the first segment of the row.

Shapes: x [B, T, H, P], dt [B, T, H] (positive, after softplus), A [H], B and C
[B, T, G, N], D [H]; states [B, H, P, N]. Everything is computed in f32; y comes back
in x's dtype, the final state in f32.

    import jax, jax.numpy as jnp
    from pallas_kernels.ssd import reference
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (1, 50, 4, 8)); dt = jax.nn.softplus(jax.random.normal(k[1], (1, 50, 4)))
    B, C = jax.random.normal(k[2], (2, 1, 50, 2, 16))
    A = -jnp.arange(1.0, 5.0)
    y1, s1 = reference.ssd_recurrence(x, dt, A, B, C)
    y2, s2 = reference.ssd_chunked(x, dt, A, B, C, chunk_size=16)   # the same, to rounding
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

f32 = jnp.float32


def seq_index(segment_ids, batch: int, length: int):
    """[B, T] int32 count of segment changes at or before each token (0 without segments).

    Two tokens s <= t belong to one run of the recurrence iff their counts are equal.
    """
    if segment_ids is None:
        return jnp.zeros((batch, length), jnp.int32)
    seg = segment_ids.astype(jnp.int32)
    change = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32),
                              (seg[:, 1:] != seg[:, :-1]).astype(jnp.int32)], axis=1)
    return jnp.cumsum(change, axis=1)


def _heads_per_group(x, B) -> int:
    return x.shape[2] // B.shape[2]


def _finish(y, x, D):
    """y + D x in f32, cast to x's dtype."""
    if D is not None:
        y = y + D.astype(f32)[None, None, :, None] * x.astype(f32)
    return y.astype(x.dtype)


# ----------------------------------------------------------------------------- recurrence
def ssd_recurrence(x, dt, A, B, C, *, D=None, segment_ids=None, initial_state=None):
    """The step-by-step recurrence (the definition). Returns (y [B,T,H,P], state [B,H,P,N])."""
    b, t, h, p = x.shape
    n = B.shape[-1]
    rep = _heads_per_group(x, B)
    Bh = jnp.repeat(B.astype(f32), rep, axis=2)  # [B, T, H, N] (a reference may repeat)
    Ch = jnp.repeat(C.astype(f32), rep, axis=2)
    seq = seq_index(segment_ids, b, t)
    reset = jnp.concatenate([jnp.zeros((b, 1), bool), seq[:, 1:] != seq[:, :-1]], axis=1)
    state = jnp.zeros((b, h, p, n), f32) if initial_state is None else initial_state.astype(f32)

    def step(state, inp):
        x_t, dt_t, B_t, C_t, reset_t = inp  # [B,H,P], [B,H], [B,H,N], [B,H,N], [B]
        decay = jnp.where(reset_t[:, None], 0.0, jnp.exp(dt_t * A.astype(f32)))  # [B, H]
        state = decay[..., None, None] * state + (dt_t[..., None] * x_t)[..., None] * B_t[:, :, None, :]
        return state, jnp.einsum("bhpn,bhn->bhp", state, C_t)

    time_major = lambda a: jnp.moveaxis(a, 1, 0)
    state, y = lax.scan(step, state, (time_major(x.astype(f32)), time_major(dt.astype(f32)),
                                      time_major(Bh), time_major(Ch), time_major(reset)))
    return _finish(jnp.moveaxis(y, 0, 1), x, D), state


def ssd_step(state, x, dt, A, B, C, *, D=None):
    """One decoding step of the recurrence: x [B,H,P], dt [B,H], B/C [B,G,N], state [B,H,P,N].

    Returns (y [B, H, P] in x's dtype, new state f32). A token with dt = 0 leaves the
    state unchanged (how the layers skip padding).
    """
    rep = x.shape[1] // B.shape[1]
    Bh = jnp.repeat(B.astype(f32), rep, axis=1)  # [B, H, N]
    Ch = jnp.repeat(C.astype(f32), rep, axis=1)
    dt = dt.astype(f32)
    state = (jnp.exp(dt * A.astype(f32))[..., None, None] * state.astype(f32)
             + (dt[..., None] * x.astype(f32))[..., None] * Bh[:, :, None, :])
    y = jnp.einsum("bhpn,bhn->bhp", state, Ch)
    if D is not None:
        y = y + D.astype(f32)[None, :, None] * x.astype(f32)
    return y.astype(x.dtype), state


# ----------------------------------------------------------------------------- chunked
class ChunkScalars(NamedTuple):
    """Per-token and per-chunk decays of the chunked form, f32, for T padded to whole chunks.

    Attributes:
      cum: [B, H, T] cumulative sum of a = dt * A inside each chunk.
      dt: [B, H, T] the step sizes (0 on padding).
      seq: [B, T] int32 seq_index (boundaries so far).
      w_end: [B, H, T] dt_s * exp(cum_last - cum_s), 0 when a boundary lies after s in
        its chunk: the weight of token s in its chunk's state (step 2).
      decay_in: [B, H, T] exp(cum_t), 0 when a boundary lies between the previous
        chunk's end and t: how much of the state entering the chunk reaches t (step 4).
      gate: [B, H, nc] exp(cum_last), 0 when the chunk holds a boundary: the state
        passed through a whole chunk (step 3).
    """

    cum: jax.Array
    dt: jax.Array
    seq: jax.Array
    w_end: jax.Array
    decay_in: jax.Array
    gate: jax.Array


def chunk_scalars(dt, A, seq, chunk_size: int) -> ChunkScalars:
    """The decays every backend shares, from dt [B, T, H] (T a multiple of chunk_size)."""
    b, t, h = dt.shape
    nc = t // chunk_size
    dt = jnp.moveaxis(dt.astype(f32), 2, 1).reshape(b, h, nc, chunk_size)  # [B, H, nc, Q]
    a = dt * A.astype(f32)[None, :, None, None]
    cum = jnp.cumsum(a, axis=-1)
    s = seq.reshape(b, 1, nc, chunk_size)
    s_last = s[..., -1:]                                                      # [B, 1, nc, 1]
    # The previous chunk's last token (the initial state counts as token 0's segment).
    s_prev = jnp.concatenate([s[:, :, :1, :1], s_last[:, :, :-1]], axis=2)    # [B, 1, nc, 1]
    cum_last = cum[..., -1:]
    w_end = dt * jnp.exp(jnp.where(s == s_last, cum_last - cum, -jnp.inf))
    decay_in = jnp.exp(jnp.where(s == s_prev, cum, -jnp.inf))
    gate = jnp.exp(jnp.where(s_last == s_prev, cum_last, -jnp.inf))[..., 0]  # [B, H, nc]
    flat = lambda v: v.reshape(b, h, t)
    return ChunkScalars(flat(cum), flat(dt), seq, flat(w_end), flat(decay_in), gate)


def padded_seq_index(segment_ids, batch: int, length: int, chunk_size: int):
    """seq_index padded to whole chunks with its last value (no boundary in the padding)."""
    t_pad = -(-length // chunk_size) * chunk_size
    seq = seq_index(segment_ids, batch, length)
    return jnp.pad(seq, [(0, 0), (0, t_pad - length)], mode="edge")


def pad_to_chunks(x, dt, B, C, segment_ids, chunk_size: int):
    """Pad the time axis to whole chunks: x, B, C with zeros, dt with 0 (padding changes
    no state), segment ids with the last one (no boundary). Returns the padded arrays
    and seq_index of the padded row."""
    b, t = x.shape[:2]
    t_pad = -(-t // chunk_size) * chunk_size
    widths = lambda a: [(0, 0), (0, t_pad - t)] + [(0, 0)] * (a.ndim - 2)
    x, dt, B, C = (jnp.pad(a, widths(a)) for a in (x, dt, B, C))
    return x, dt, B, C, padded_seq_index(segment_ids, b, t, chunk_size)


def ssd_chunked(x, dt, A, B, C, *, chunk_size: int, D=None, segment_ids=None,
                initial_state=None):
    """The chunked SSD (steps 1-4 of the module docstring) in f32 jnp.

    Any length: the sequence is padded to whole chunks and cut back. Returns
    (y [B, T, H, P], final state [B, H, P, N] f32).
    """
    b, t, h, p = x.shape
    g, n = B.shape[2:]
    r, q = h // g, chunk_size
    xp, dtp, Bp, Cp, seq = pad_to_chunks(x, dt, B, C, segment_ids, q)
    nc = xp.shape[1] // q
    sc = chunk_scalars(dtp, A, seq, q)
    heads = lambda v: v.reshape(b, g, r, nc, q)                        # [B, H, T] -> [B, G, R, nc, Q]
    cum, dts, w_end, decay_in = (heads(v) for v in (sc.cum, sc.dt, sc.w_end, sc.decay_in))
    xc = xp.astype(f32).reshape(b, nc, q, g, r, p)                     # [B, nc, Q, G, R, P]
    Bc = Bp.astype(f32).reshape(b, nc, q, g, n)                        # [B, nc, Q, G, N]
    Cc = Cp.astype(f32).reshape(b, nc, q, g, n)
    sq = seq.reshape(b, nc, q)

    # 1. Inside each chunk: y_t = sum_{s <= t, same run} (C_t . B_s) exp(cum_t - cum_s) dt_s x_s.
    keep = (jnp.tril(jnp.ones((q, q), bool))[None, None]
            & (sq[..., :, None] == sq[..., None, :]))                    # [B, nc, Q, Q]
    diff = cum[..., :, None] - cum[..., None, :]                        # [B, G, R, nc, Q, Q]
    L = jnp.exp(jnp.where(keep[:, None, None], diff, -jnp.inf))         # 0 where masked, no inf
    # Every einsum here takes two operands, contracted in the order written: a many-operand
    # jnp.einsum let opt_einsum pick the order, and it built [B, nc, Q, Q, H, P] products
    # (8 GiB f32 at B=2, T=4k, H=16; 48 GiB in a 1B hybrid's step) that XLA's GPU autotuner
    # then spent minutes on.
    CB = jnp.einsum("bclgn,bcsgn->bgcls", Cc, Bc)                       # [B, G, nc, Q, Q]
    M = CB[:, :, None] * L * dts[..., None, :]                          # [B, G, R, nc, Q, Q]
    y_diag = jnp.einsum("bgrcls,bcsgrp->bclgrp", M, xc)

    # 2. Each chunk's contribution to the state at its end.
    x_end = xc * jnp.moveaxis(w_end, (1, 2), (3, 4))[..., None]          # [B, nc, Q, G, R, P]
    local = jnp.einsum("bcsgn,bcsgrp->bcgrpn", Bc, x_end)               # [B, nc, G, R, P, N]

    # 3. Pass the states from chunk to chunk: S_in[c+1] = gate[c] S_in[c] + local[c].
    s0 = (jnp.zeros((b, h, p, n), f32) if initial_state is None
          else initial_state.astype(f32)).reshape(b, g, r, p, n)
    gate = sc.gate.reshape(b, g, r, nc)

    def pass_chunk(s, inp):
        gate_c, local_c = inp                                            # [B, G, R], [B, G, R, P, N]
        return gate_c[..., None, None] * s + local_c, s

    final, s_in = lax.scan(pass_chunk, s0, (jnp.moveaxis(gate, 3, 0), jnp.moveaxis(local, 1, 0)))
    s_in = jnp.moveaxis(s_in, 0, 1)                                      # [B, nc, G, R, P, N]

    # 4. The state entering each chunk, read out by C and decayed to each token.
    y_off = (jnp.einsum("bclgn,bcgrpn->bclgrp", Cc, s_in)
             * jnp.moveaxis(decay_in, (1, 2), (3, 4))[..., None])
    y = (y_diag + y_off).reshape(b, nc * q, h, p)[:, :t]
    return _finish(y, x, D), final.reshape(b, h, p, n)
