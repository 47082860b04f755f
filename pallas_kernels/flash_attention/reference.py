"""Plain-jnp attention: the specification of every mask the kernels implement.

Layout is BTHD, as in `jax.nn.dot_product_attention`:
  q [B, Tq, H, Dqk], k [B, Tk, Hkv, Dqk], v [B, Tk, Hkv, Dv], H % Hkv == 0.

Mask rules (a query/key pair is kept when every rule that is switched on keeps it):
  * positions: query i sits at `q_positions[b, i]`, key j at `kv_positions[b, j]`.
    Defaults: keys at 0..Tk-1, queries aligned at the end (Tk-Tq .. Tk-1), which is
    what decode and chunked prefill need.
  * causal:          kv_pos <= q_pos
  * sliding_window:  q_pos - kv_pos < W  (and kv_pos - q_pos < W when not causal),
                     so each token sees W tokens including itself (Mistral, Gemma).
  * segment_ids:     q_seg == kv_seg (packed documents; 0 marks padding).
A row with no kept key outputs 0 (not NaN) and has log-sum-exp -inf.

Logits are `sm_scale * q.k` (default 1/sqrt(Dqk)), optionally soft-capped
`cap * tanh(s / cap)` (Gemma 2), and optional per-head `sinks` add a learned logit
to the softmax denominator only (attention sinks, gpt-oss / StreamingLLM).
Softmax is computed in f32.

Attention dropout (`dropout_rate > 0`, as torch's `scaled_dot_product_attention`
dropout_p): o = (p * keep / (1 - rate)) @ v with keep[b, h, i, j] from
`dropout.keep_mask(seed, b, h, i, j)`; the log-sum-exp stays that of the undropped softmax.
"""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.flash_attention.dropout import keep_mask

NEG_INF = float("-inf")


def default_positions(batch: int, q_len: int, kv_len: int):
    """Keys at 0..Tk-1; queries aligned at the end of the keys."""
    kv_pos = jnp.broadcast_to(jnp.arange(kv_len, dtype=jnp.int32), (batch, kv_len))
    q_pos = jnp.broadcast_to(jnp.arange(kv_len - q_len, kv_len, dtype=jnp.int32), (batch, q_len))
    return q_pos, kv_pos


def split_segment_ids(segment_ids, q_len: int, kv_len: int):
    """`segment_ids` is one [B, T] array (q_len == kv_len) or a (q_seg, kv_seg) pair."""
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        q_seg, kv_seg = segment_ids
    else:
        q_seg = kv_seg = segment_ids
    return q_seg, kv_seg


def attention_mask(
    batch: int,
    q_len: int,
    kv_len: int,
    *,
    causal: bool,
    sliding_window: int | None = None,
    q_segment_ids=None,
    kv_segment_ids=None,
    q_positions=None,
    kv_positions=None,
):
    """Boolean mask [B, 1, Tq, Tk]: True where query i may attend to key j."""
    dq, dkv = default_positions(batch, q_len, kv_len)
    q_pos = dq if q_positions is None else q_positions
    kv_pos = dkv if kv_positions is None else kv_positions
    diff = q_pos[:, :, None] - kv_pos[:, None, :]  # [B, Tq, Tk]
    mask = jnp.ones((batch, q_len, kv_len), dtype=bool)
    if causal:
        mask &= diff >= 0
    if sliding_window is not None:
        mask &= diff < sliding_window
        if not causal:
            mask &= -diff < sliding_window
    if q_segment_ids is not None:
        mask &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return mask[:, None]


def attention_logits(q, k, *, sm_scale=None, logit_soft_cap=None):
    """Scaled (and soft-capped) logits in f32, [B, H, Tq, Tk]; GQA by head grouping."""
    b, tq, h, d = q.shape
    hkv = k.shape[2]
    if sm_scale is None:
        sm_scale = d**-0.5
    qg = q.reshape(b, tq, hkv, h // hkv, d)  # query heads grouped by their kv head
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)
    s = s.reshape(b, h, tq, k.shape[1]) * sm_scale
    if logit_soft_cap is not None:
        s = logit_soft_cap * jnp.tanh(s / logit_soft_cap)
    return s


def mha_reference(
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
    return_lse: bool = False,
    dropout_rate: float = 0.0,
    dropout_seed=None,
):
    """Attention output [B, Tq, H, Dv] (and log-sum-exp [B, H, Tq] if asked)."""
    b, tq, h, _ = q.shape
    tk, hkv, dv = v.shape[1], v.shape[2], v.shape[3]
    q_seg, kv_seg = split_segment_ids(segment_ids, tq, tk)
    s = attention_logits(q, k, sm_scale=sm_scale, logit_soft_cap=logit_soft_cap)
    mask = attention_mask(
        b, tq, tk, causal=causal, sliding_window=sliding_window,
        q_segment_ids=q_seg, kv_segment_ids=kv_seg,
        q_positions=q_positions, kv_positions=kv_positions,
    )
    s = jnp.where(mask, s, NEG_INF)
    m = jnp.max(s, axis=-1, keepdims=True)
    if sinks is not None:
        m = jnp.maximum(m, sinks.astype(jnp.float32)[None, :, None, None])
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m_safe)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + jnp.exp(sinks.astype(jnp.float32)[None, :, None, None] - m_safe)
    p = p / jnp.where(denom == 0, 1.0, denom)  # [B, H, Tq, Tk]
    if dropout_rate > 0:
        iota = lambda n: jnp.arange(n, dtype=jnp.int32)
        keep = keep_mask(dropout_seed,
                         iota(b)[:, None, None, None], iota(h)[None, :, None, None],
                         iota(tq)[None, None, :, None], iota(tk)[None, None, None, :],
                         rate=dropout_rate)  # [B, H, Tq, Tk]
        p = jnp.where(keep, p / (1.0 - dropout_rate), 0.0)
    pg = p.reshape(b, hkv, h // hkv, tq, tk).astype(v.dtype)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", pg, v, preferred_element_type=jnp.float32)
    o = o.reshape(b, tq, h, dv).astype(q.dtype)
    if not return_lse:
        return o
    lse = jnp.where(denom[..., 0] > 0, m_safe[..., 0] + jnp.log(denom[..., 0]), NEG_INF)
    return o, lse


def max_logits_reference(q, k, *, causal=False, sliding_window=None, segment_ids=None,
                         q_positions=None, kv_positions=None, sm_scale=None):
    """Per-head max pre-softmax logit over the batch, [H] (for QK-Clip). Masked pairs excluded."""
    b, tq = q.shape[:2]
    tk = k.shape[1]
    q_seg, kv_seg = split_segment_ids(segment_ids, tq, tk)
    s = attention_logits(q, k, sm_scale=sm_scale)
    mask = attention_mask(b, tq, tk, causal=causal, sliding_window=sliding_window,
                          q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                          q_positions=q_positions, kv_positions=kv_positions)
    s = jnp.where(mask, s, NEG_INF)
    return jnp.max(s, axis=(0, 2, 3))


