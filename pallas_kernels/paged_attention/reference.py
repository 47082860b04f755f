"""Plain-jnp paged decode attention: the specification the kernels implement.

PagedAttention (Kwon et al., 2023, "Efficient Memory Management for Large Language
Model Serving with PagedAttention", https://arxiv.org/abs/2309.06180) stores the KV
cache in fixed-size pages drawn from one pool; a per-sequence page table lists which
pages hold the sequence's tokens, in order:

    token t of sequence b lives at  k_pages[:, page_table[b, t // page_size], t % page_size]

One decode step attends the newest query of each sequence to its first `lengths[b]`
keys. Shapes:

    q          [B, H, D]                            one query token per sequence
    k_pages    [kv_heads, num_pages, page_size, D]  the pool (v_pages the same)
    lengths    [B] int32                             keys per sequence (0 allowed)
    page_table [B, max_pages] int32                  entries past a sequence's pages
                                                     may hold anything (clipped)

Query head h reads kv head h // (H // kv_heads) (GQA). Logits are `sm_scale * q.k`
(default 1/sqrt(D)), optionally soft-capped `cap * tanh(s / cap)`; with a
`sliding_window` W only the last W keys (positions >= length - W) are kept, matching
the decode row of the sliding-window mask in flash_attention/reference.py. Softmax in
f32; a sequence with no keys outputs 0.

    >>> import jax.numpy as jnp
    >>> q = jnp.ones((1, 4, 8)); kp = jnp.ones((2, 3, 4, 8)); vp = jnp.ones((2, 3, 4, 8))
    >>> o = paged_attention_reference(q, kp, vp, jnp.array([6], jnp.int32),
    ...                               jnp.array([[2, 0]], jnp.int32))
    >>> o.shape
    (1, 4, 8)
"""
from __future__ import annotations

import jax.numpy as jnp


def gather_pages(pages, page_table):
    """Dense per-sequence keys from the pool: [Hkv, P, S, D], [B, M] -> [B, M * S, Hkv, D]."""
    hkv, num_pages, page_size, d = pages.shape
    b, max_pages = page_table.shape
    idx = jnp.clip(page_table, 0, num_pages - 1)
    x = pages[:, idx]  # [Hkv, B, M, S, D]
    x = x.reshape(hkv, b, max_pages * page_size, d)  # [Hkv, B, T, D]
    return x.transpose(1, 2, 0, 3)  # [B, T, Hkv, D]


def key_mask(lengths, kv_len: int, sliding_window: int | None = None):
    """[B, T] bool: key t is visible to the decode query of a sequence of `lengths` keys."""
    pos = jnp.arange(kv_len, dtype=jnp.int32)[None, :]
    lengths = lengths[:, None]
    mask = pos < lengths
    if sliding_window is not None:
        mask &= pos >= lengths - sliding_window
    return mask


def paged_attention_reference(
    q,
    k_pages,
    v_pages,
    lengths,
    page_table,
    *,
    sm_scale: float | None = None,
    logit_soft_cap: float | None = None,
    sliding_window: int | None = None,
    return_lse: bool = False,
):
    """Decode attention over paged K/V: gather the pages, then masked softmax in f32.

    Returns o [B, H, D] in q's dtype; with `return_lse`, o in f32 (a partial result to
    merge) and the log-sum-exp [B, H], -inf for empty rows.
    """
    b, h, d = q.shape
    hkv = k_pages.shape[0]
    if sm_scale is None:
        sm_scale = d**-0.5
    k = gather_pages(k_pages, page_table).astype(jnp.float32)  # [B, T, Hkv, D]
    v = gather_pages(v_pages, page_table).astype(jnp.float32)
    qg = q.astype(jnp.float32).reshape(b, hkv, h // hkv, d)  # q heads grouped per kv head
    s = jnp.einsum("bhgd,bthd->bhgt", qg, k) * sm_scale  # [B, Hkv, G, T]
    if logit_soft_cap is not None:
        s = logit_soft_cap * jnp.tanh(s / logit_soft_cap)
    mask = key_mask(lengths, k.shape[1], sliding_window)[:, None, None, :]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # empty rows: avoid -inf - -inf
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bhgt,bthd->bhgd", p, v) / jnp.where(denom == 0, 1.0, denom)
    o = o.reshape(b, h, d)
    if not return_lse:
        return o.astype(q.dtype)
    lse = jnp.where(denom > 0, m + jnp.log(denom), -jnp.inf)
    return o, lse.reshape(b, h)
