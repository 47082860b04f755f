"""KV caches for autoregressive decoding: dense, rolling window, MLA latent, paged.

A decoder that generates token t+1 needs the keys and values of tokens 0..t in every
layer; a KV cache keeps them so that each step computes only the new token's (the
incremental decoding of Transformer-XL / Ott et al. 2019's fairseq, standard since).
Every cache here holds, per layer, two arrays `k, v` of shape [B, S, H, D] (for MLA:
the latent c_KV as k [B, S, 1, kv_lora_rank] and the shared RoPE key k_R as
v [B, S, 1, qk_rope_head_dim], DeepSeek-V2 arXiv:2405.04434 §2.1.2) and one of four
layouts:

  DenseKV    S = max_len slots; sequence b writes its next token at slot lengths[b]
             (ragged lengths: continuous batching puts sequences of any length side
             by side). Keys carry their positions, so the attention mask is exact.
  RollingKV  S = window slots (Mistral's rolling buffer, Jiang et al. 2023): position p
             lives at slot p % window. Memory is bounded by the window, for
             sliding-window ("local") layers, and by the chunk for "chunked" layers
             (a query never sees past the start of its chunk). A prefill longer than
             the window attends over [old buffer, new tokens] before writing, so
             every query still sees its whole window.
  PagedKV    pages of a pool shared by all sequences (PagedAttention, Kwon et al.
             2023, arXiv:2309.06180) with a per-sequence page table (serving/paged.py
             keeps the tables on the host); decode runs the paged_attention kernel.

Layers without attention (hybrids, arch/ssm.py) keep no keys: a Mamba-2 layer's cache is
`SSMState`, the fixed-size state of its recurrence per row (the last d_conv - 1 conv
inputs and the SSD state [B, H, P, N]), whatever the sequence length; a feed-forward-only
layer ("mlp") keeps just `Lengths`. Their sequences are per row and cannot share pages,
so hybrids take the dense or rolling layouts, not "paged".

Masks: each new token has a position and a validity (segment_ids != 0); each cached
key its position and validity. Attention then runs with explicit
`q_positions`/`kv_positions` and a (q_seg, kv_seg) pair (see
pallas_kernels/flash_attention/reference.py): causal and sliding-window masks compare
positions, and "chunked" layers put the chunk index pos // chunk_size into the
segment ids, so queries meet only keys of their own chunk.

Padding: tokens with segment id 0 are not written and do not advance `lengths`, so
rows of a batch can carry different numbers of new tokens (ragged prefill), and a row
with no valid token is left untouched (an idle slot of the engine).

Every cache is a pytree (flax.struct dataclass): it goes through `jax.jit` and comes
back updated in `aux["cache"]`:

    import jax.numpy as jnp
    from arch import build_model
    from configs.llama3 import get_config
    from serving.cache import init_cache

    cfg = get_config("tiny").model
    model = build_model(cfg)
    cache = init_cache(cfg, batch=1, max_len=32)             # a tuple, one per layer
    prompt = jnp.array([[1, 2, 3]])
    logits, aux = model(prompt, cache=cache)                 # prefill: positions 0..2
    nxt = logits[:, -1].argmax(-1)[:, None]
    logits, aux = model(nxt, cache=aux["cache"])             # decode: position 3
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

import pallas_kernels
from arch.attention import layer_kind
from arch.common import check_choice, dtype_of
from arch.ssm import ssm_dims
from pallas_kernels.paged_attention import IMPLS as PAGED_IMPLS
from pallas_kernels.paged_attention import gather_pages
from pallas_kernels.paged_attention.api import returns_lse
from pallas_kernels.paged_attention.cascade import SharedPrefix, cascade_paged_attention
from serving.paged import write_kv

KINDS = ("dense", "rolling", "paged")


# ---------------------------------------------------------------------------- what attention sees


class KVView(NamedTuple):
    """Keys and values to attend to after an update, with what the mask needs.

    Attributes:
      k, v: [B, S, H, D] cached and new keys/values.
      kv_positions: [B, S] int32 position of each key (anything where invalid).
      kv_valid: [B, S] bool, False for empty slots.
      q_positions: [B, T] int32 positions of the new tokens.
      q_valid: [B, T] bool, False for padding.
    """

    k: jax.Array
    v: jax.Array
    kv_positions: jax.Array
    kv_valid: jax.Array
    q_positions: jax.Array
    q_valid: jax.Array

    def mask_kwargs(self, chunk_size: int | None = None) -> dict:
        """segment_ids / q_positions / kv_positions for `pallas_kernels.attention`.

        Valid tokens are segment 1 (or 1 + their chunk index for chunked layers),
        padding and empty slots segment 0.
        """
        q_seg, kv_seg = self.q_valid.astype(jnp.int32), self.kv_valid.astype(jnp.int32)
        if chunk_size is not None:
            q_seg = q_seg * (self.q_positions // chunk_size + 1)
            kv_seg = kv_seg * (self.kv_positions // chunk_size + 1)
        return dict(segment_ids=(q_seg, kv_seg), q_positions=self.q_positions,
                    kv_positions=self.kv_positions)


def _token_validity(positions, segment_ids):
    """[B, T] bool: True for real tokens (segment id != 0)."""
    if segment_ids is None:
        return jnp.ones(positions.shape, bool)
    return segment_ids != 0


def _write_slots(lengths, valid, drop: int):
    """Slot of each new token: lengths[b] + its rank among the row's valid tokens;
    padding goes to `drop` (out of range: the scatter drops it)."""
    rank = jnp.cumsum(valid, axis=1) - 1  # [B, T]
    return jnp.where(valid, lengths[:, None] + rank, drop)


def _scatter_rows(buf, slots, x):
    """buf [B, S, ...] with x [B, T, ...] written at slots [B, T]; out-of-range slots dropped."""
    rows = jnp.arange(buf.shape[0])[:, None]  # [B, 1]
    return buf.at[rows, slots].set(x.astype(buf.dtype), mode="drop")


def _concrete(x):
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_capacity(lengths, valid, capacity: int, what: str) -> None:
    """ValueError when a row would outgrow the cache (checked only outside jit)."""
    lens, n = _concrete(lengths), _concrete(valid)
    if lens is None or n is None:
        return
    need = lens + n.sum(axis=1)
    if need.size and need.max() > capacity:
        raise ValueError(f"sequence length {int(need.max())} exceeds the {what} capacity "
                         f"{capacity}; allocate a larger cache (max_len)")


class _Attend:
    """`attend` for standard (GQA) attention layers, shared by the cache layouts."""

    def attend(self, q, k, v, *, positions, segment_ids=None, causal=True, sliding_window=None,
               chunk_size=None, logit_soft_cap=None, sm_scale=None, sinks=None, impl="auto"):
        """Write the new k, v [B, T, Hkv, D]; attend q [B, T, H, D] over the cache.

        Returns (o [B, T, H, D], updated cache).
        """
        cache, view = self.update(k, v, positions=positions, segment_ids=segment_ids)
        o = pallas_kernels.attention(
            q, view.k, view.v, causal=causal, sliding_window=sliding_window,
            logit_soft_cap=logit_soft_cap, sm_scale=sm_scale, sinks=sinks, impl=impl,
            **view.mask_kwargs(chunk_size))
        return o, cache


# ---------------------------------------------------------------------------- dense


@struct.dataclass
class DenseKV(_Attend):
    """Per-layer dense cache: k, v [B, S, H, D], positions [B, S], lengths [B]."""

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    lengths: jax.Array

    @classmethod
    def create(cls, batch, max_len, k_shape, v_shape, dtype):
        return cls(k=jnp.zeros((batch, max_len, *k_shape), dtype),
                   v=jnp.zeros((batch, max_len, *v_shape), dtype),
                   positions=jnp.zeros((batch, max_len), jnp.int32),
                   lengths=jnp.zeros((batch,), jnp.int32))

    def update(self, k, v, *, positions, segment_ids=None):
        """Write new k, v [B, T, H, D] at each row's offset; return (cache, KVView)."""
        valid = _token_validity(positions, segment_ids)
        size = self.k.shape[1]
        _check_capacity(self.lengths, valid, size, "dense cache")
        slots = _write_slots(self.lengths, valid, drop=size)
        new = DenseKV(k=_scatter_rows(self.k, slots, k), v=_scatter_rows(self.v, slots, v),
                      positions=_scatter_rows(self.positions, slots, positions.astype(jnp.int32)),
                      lengths=self.lengths + valid.sum(axis=1, dtype=jnp.int32))
        kv_valid = jnp.arange(size)[None, :] < new.lengths[:, None]  # [B, S]
        return new, KVView(new.k, new.v, new.positions, kv_valid, positions, valid)

    def reset(self, rows):
        """Empty the rows where `rows` [B] is True (a slot given to a new sequence)."""
        return self.replace(lengths=jnp.where(rows, 0, self.lengths))


# ---------------------------------------------------------------------------- rolling


@struct.dataclass
class RollingKV(_Attend):
    """Per-layer rolling buffer: position p at slot p % window.

    k, v [B, W, H, D], positions [B, W], valid [B, W] (slot holds a token of the
    current sequence), lengths [B] (tokens seen, for default positions).
    """

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    valid: jax.Array
    lengths: jax.Array

    @classmethod
    def create(cls, batch, window, k_shape, v_shape, dtype):
        return cls(k=jnp.zeros((batch, window, *k_shape), dtype),
                   v=jnp.zeros((batch, window, *v_shape), dtype),
                   positions=jnp.zeros((batch, window), jnp.int32),
                   valid=jnp.zeros((batch, window), bool),
                   lengths=jnp.zeros((batch,), jnp.int32))

    def update(self, k, v, *, positions, segment_ids=None):
        """Attend over [buffer, new tokens]; keep the newest `window` tokens of each row."""
        valid = _token_validity(positions, segment_ids)
        positions = positions.astype(jnp.int32)
        window = self.k.shape[1]
        view = KVView(jnp.concatenate([self.k, k.astype(self.k.dtype)], axis=1),  # [B, W+T, H, D]
                      jnp.concatenate([self.v, v.astype(self.v.dtype)], axis=1),
                      jnp.concatenate([self.positions, positions], axis=1),
                      jnp.concatenate([self.valid, valid], axis=1), positions, valid)
        # Only the last `window` valid tokens of a row survive: writing earlier ones too
        # would put two tokens on one slot in one scatter (undefined order).
        n = valid.sum(axis=1, dtype=jnp.int32)
        rank = jnp.cumsum(valid, axis=1) - 1
        keep = valid & (rank >= n[:, None] - window)
        slots = jnp.where(keep, positions % window, window)
        new = RollingKV(k=_scatter_rows(self.k, slots, k), v=_scatter_rows(self.v, slots, v),
                        positions=_scatter_rows(self.positions, slots, positions),
                        valid=_scatter_rows(self.valid, slots, keep),
                        lengths=self.lengths + n)
        return new, view

    def reset(self, rows):
        return self.replace(valid=self.valid & ~rows[:, None], lengths=jnp.where(rows, 0, self.lengths))


# ---------------------------------------------------------------------------- paged


@struct.dataclass
class PagedKV(_Attend):
    """Per-layer paged cache over a page pool (layout of pallas_kernels.paged_attention).

    k_pages, v_pages: [H, num_pages, page_size, D] pools; page_table [B, max_pages]
    and lengths [B] int32 say where each sequence's tokens are (token t of row b at
    page page_table[b, t // page_size], slot t % page_size). Positions are slot
    indices: a row's new tokens must sit at positions lengths[b], lengths[b] + 1, ...
    The host (serving/paged.py BlockTables) owns the tables; `set_page_tables` puts
    them into a cache, and the engine builds a PagedKV from its pools and the host's
    tables inside each jitted call (any number of rows: prefill runs only new requests).
    """

    k_pages: jax.Array
    v_pages: jax.Array
    page_table: jax.Array
    lengths: jax.Array
    # Pages that rows share (a radix-cached prompt): decode reads them once per chunk
    # of rows (pallas_kernels/paged_attention/cascade.py). Set by the engine per call.
    prefix: SharedPrefix | None = None
    # The decode kernel's tiling (the paged backend's BlockSizes, e.g.
    # paged_attention.gpu.BlockSizes(kernel="triton")); None: the backend's defaults.
    block_sizes: Any = struct.field(pytree_node=False, default=None)

    @classmethod
    def create(cls, batch, max_len, k_shape, v_shape, dtype, *, page_size, num_pages):
        max_pages = -(-max_len // page_size)
        (hk, dk), (hv, dv) = k_shape, v_shape
        return cls(k_pages=jnp.zeros((hk, num_pages, page_size, dk), dtype),
                   v_pages=jnp.zeros((hv, num_pages, page_size, dv), dtype),
                   page_table=jnp.zeros((batch, max_pages), jnp.int32),
                   lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[2]

    def _write(self, k, v, valid):
        b, t = valid.shape
        num_pages, ps = self.k_pages.shape[1], self.page_size
        capacity = self.page_table.shape[1] * ps
        _check_capacity(self.lengths, valid, capacity, "page table")
        slots = _write_slots(self.lengths, valid, drop=capacity)  # [B, T]
        in_range = slots < capacity
        page = jnp.take_along_axis(self.page_table, jnp.where(in_range, slots // ps, 0), axis=1)
        page = jnp.where(in_range, page, num_pages)  # num_pages: dropped by write_kv
        k_pages, v_pages = write_kv(self.k_pages, self.v_pages,
                                    k.reshape(b * t, *k.shape[2:]), v.reshape(b * t, *v.shape[2:]),
                                    page.reshape(-1), (slots % ps).reshape(-1))
        return self.replace(k_pages=k_pages, v_pages=v_pages,
                            lengths=self.lengths + valid.sum(axis=1, dtype=jnp.int32))

    def update(self, k, v, *, positions, segment_ids=None):
        """Write into the pages; the view gathers each row's pages into dense keys."""
        valid = _token_validity(positions, segment_ids)
        new = self._write(k, v, valid)
        keys = gather_pages(new.k_pages, new.page_table)  # [B, max_pages * page_size, H, D]
        values = gather_pages(new.v_pages, new.page_table)
        b, s = keys.shape[:2]
        kv_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        kv_valid = kv_pos < new.lengths[:, None]
        return new, KVView(keys, values, kv_pos, kv_valid, positions.astype(jnp.int32), valid)

    def attend(self, q, k, v, *, positions, segment_ids=None, causal=True, sliding_window=None,
               chunk_size=None, logit_soft_cap=None, sm_scale=None, sinks=None, impl="auto"):
        """Decode (one token per row, causal) runs the paged_attention kernel on the
        pool; prefill and what the kernel lacks (chunks, sinks) attend over gathered pages."""
        if q.shape[1] != 1 or not causal or chunk_size is not None or sinks is not None:
            return super().attend(q, k, v, positions=positions, segment_ids=segment_ids,
                                  causal=causal, sliding_window=sliding_window,
                                  chunk_size=chunk_size, logit_soft_cap=logit_soft_cap,
                                  sm_scale=sm_scale, sinks=sinks, impl=impl)
        new = self._write(k, v, _token_validity(positions, segment_ids))
        impl = impl if impl in PAGED_IMPLS else "auto"
        # Cascade where the backend merges by its own log-sum-exp (not the TPU kernel:
        # there it would fall back to the gathering reference, slower than no cascade).
        if self.prefix is not None and sliding_window is None and returns_lse(impl):
            o = cascade_paged_attention(
                q[:, 0], new.k_pages, new.v_pages, new.lengths, self.prefix, sm_scale=sm_scale,
                logit_soft_cap=logit_soft_cap, impl=impl, block_sizes=self.block_sizes)
            return o[:, None], new
        o = pallas_kernels.paged_attention(
            q[:, 0], new.k_pages, new.v_pages, new.lengths, new.page_table, sm_scale=sm_scale,
            logit_soft_cap=logit_soft_cap, sliding_window=sliding_window, impl=impl,
            block_sizes=self.block_sizes)
        return o[:, None], new  # [B, 1, H, D]

    def reset(self, rows):
        return self.replace(lengths=jnp.where(rows, 0, self.lengths))


# ---------------------------------------------------------------------------- recurrent layers


@struct.dataclass
class SSMState:
    """Per-layer state of a Mamba-2 layer (arch/ssm.py updates it).

    conv [B, d_conv - 1, channels]: the last conv inputs (x, B, C channels) of each row;
    ssm [B, H, P, N] f32: the SSD state after the row's last token; lengths [B].
    """

    conv: jax.Array
    ssm: jax.Array
    lengths: jax.Array

    @classmethod
    def create(cls, batch, cfg, dtype):
        h, p, _, n, channels = ssm_dims(cfg)
        return cls(conv=jnp.zeros((batch, cfg.ssm.d_conv - 1, channels), dtype),
                   ssm=jnp.zeros((batch, h, p, n), jnp.float32),
                   lengths=jnp.zeros((batch,), jnp.int32))

    def reset(self, rows):
        """Zero the rows where `rows` [B] is True (a slot given to a new sequence)."""
        return self.replace(conv=jnp.where(rows[:, None, None], 0, self.conv),
                            ssm=jnp.where(rows[:, None, None, None], 0, self.ssm),
                            lengths=jnp.where(rows, 0, self.lengths))


@struct.dataclass
class Lengths:
    """The cache of a layer that keeps nothing (a feed-forward alone): tokens seen per row."""

    lengths: jax.Array

    @classmethod
    def create(cls, batch):
        return cls(lengths=jnp.zeros((batch,), jnp.int32))

    def advance(self, segment_ids, num_tokens: int):
        n = num_tokens if segment_ids is None else (segment_ids != 0).sum(axis=1, dtype=jnp.int32)
        return self.replace(lengths=self.lengths + n)

    def reset(self, rows):
        return self.replace(lengths=jnp.where(rows, 0, self.lengths))


# ---------------------------------------------------------------------------- whole-model helpers


def layer_cache_shapes(cfg) -> tuple[tuple[int, int], tuple[int, int]]:
    """(H, D) of the k and v a layer caches: GQA k/v heads, or MLA's latent and RoPE key."""
    if cfg.get("mla") is not None:
        return (1, cfg.mla.kv_lora_rank), (1, cfg.mla.qk_rope_head_dim)
    return (cfg.num_kv_heads, cfg.head_dim), (cfg.num_kv_heads, cfg.head_dim)


def layer_window(cfg, layer_idx: int) -> int | None:
    """Tokens a query of this layer can see at most (None: unbounded)."""
    kind = layer_kind(cfg, layer_idx)
    if kind == "local":
        return cfg.sliding_window
    if kind == "chunked":
        return cfg.chunk_size
    return None


def validate_cache_request(cfg, batch: int, max_len: int, kind: str) -> None:
    check_choice("kind", kind, KINDS)
    if cfg.get("kind", "decoder") != "decoder" or not cfg.get("causal", True):
        raise ValueError(f"a KV cache needs a causal decoder; got model.kind={cfg.get('kind')!r}, "
                         f"model.causal={cfg.get('causal')!r}")
    if cfg.get("scan_layers", False):
        raise ValueError("model.scan_layers=True is not supported with a KV cache; "
                         "build the model with scan_layers=False (a list of layers)")
    recurrent = sorted({layer_kind(cfg, i) for i in range(cfg.num_layers)} & {"mamba", "mlp"})
    if kind == "paged" and recurrent:
        raise ValueError(f"kind='paged' needs attention in every layer, but model.layer_pattern has "
                         f"{recurrent} layers, whose per-row state cannot live in shared pages; "
                         "use kind='dense' or 'rolling'")
    for name, value in (("batch", batch), ("max_len", max_len)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int")
    if max_len > cfg.max_seq_len:
        raise ValueError(f"{max_len=} must be <= model.max_seq_len={cfg.max_seq_len}")


def init_cache(cfg, batch: int, max_len: int, kind: str = "dense", *, dtype=None,
               page_size: int = 16, num_pages: int | None = None) -> tuple:
    """An empty cache for every layer of a decoder: a tuple of per-layer caches.

    Args:
      cfg: the model config (cfg.model of a family config).
      batch: rows (sequences decoded side by side).
      max_len: longest sequence (prompt + generated tokens) a row can hold.
      kind: "dense" (every layer DenseKV of max_len), "rolling" (local and chunked
        layers RollingKV bounded by their window, the rest DenseKV), "paged" (every
        layer PagedKV over a shared-layout pool). Whatever the kind, "mamba" layers get
        an SSMState and "mlp" layers a Lengths.
      dtype: cache dtype; default the model's compute dtype.
      page_size, num_pages: paged only; num_pages defaults to enough for every row
        at max_len.
    """
    validate_cache_request(cfg, batch, max_len, kind)
    dtype = dtype_of(dtype or cfg.dtype)
    k_shape, v_shape = layer_cache_shapes(cfg)
    if kind == "paged":
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"{page_size=} must be a positive int")
        num_pages = num_pages or batch * -(-max_len // page_size)
        if not isinstance(num_pages, int) or num_pages < 1:
            raise ValueError(f"{num_pages=} must be a positive int")
    layers = []
    for i in range(cfg.num_layers):
        window = layer_window(cfg, i)
        if layer_kind(cfg, i) == "mamba":
            layers.append(SSMState.create(batch, cfg, dtype))
        elif layer_kind(cfg, i) == "mlp":
            layers.append(Lengths.create(batch))
        elif kind == "paged":
            layers.append(PagedKV.create(batch, max_len, k_shape, v_shape, dtype,
                                         page_size=page_size, num_pages=num_pages))
        elif kind == "rolling" and window is not None and window < max_len:
            layers.append(RollingKV.create(batch, window, k_shape, v_shape, dtype))
        else:
            layers.append(DenseKV.create(batch, max_len, k_shape, v_shape, dtype))
    return tuple(layers)


def reset_rows(cache: tuple, rows) -> tuple:
    """Empty the rows [B] bool of every layer (a slot starts a new sequence)."""
    rows = jnp.asarray(rows, bool)
    return tuple(layer.reset(rows) for layer in cache)


def set_page_tables(cache: tuple, page_table, lengths) -> tuple:
    """Give every paged layer the host's page table [B, max_pages] and lengths [B]."""
    page_table = jnp.asarray(page_table, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    out = []
    for layer in cache:
        if not isinstance(layer, PagedKV):
            raise ValueError(f"set_page_tables needs a paged cache, got {type(layer).__name__}")
        if page_table.shape != layer.page_table.shape:
            raise ValueError(f"page_table must be {layer.page_table.shape}, got {page_table.shape}")
        # A copy per layer: the engine donates the cache, and one buffer may not be donated twice.
        out.append(layer.replace(page_table=jnp.copy(page_table), lengths=jnp.copy(lengths)))
    return tuple(out)


def cache_bytes(cache: tuple) -> int:
    """Bytes held by the cache's arrays (for comparing layouts)."""
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(cache))
