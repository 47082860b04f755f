"""Multi-head attention with grouped KV heads, as modern decoders use it.

MHA (Vaswani et al. 2017) has one K/V head per query head; MQA (Shazeer 2019) one K/V
head for all; GQA (Ainslie et al. 2023) `num_kv_heads` groups. The kernels take K/V
with their own head count, so nothing is repeated in memory.

Per-layer options (config fields in configs/base.py):
  layer kind   global | local (sliding window, Mistral/Gemma) | nope (no RoPE: SmolLM 3,
               Llama 4) | chunked (attend within fixed chunks: Llama 4) — from
               `layer_pattern`, e.g. Gemma 3's ("local",)*5 + ("global",).
  qk_norm      RMSNorm on q and k before RoPE (OLMo 2 over all heads, Qwen 3/Gemma 3 per head).
  soft-cap     cap * tanh(logits / cap) (Gemma 2).
  sinks        a learned per-head logit in the softmax denominator (gpt-oss).

    attn = Attention(cfg, rngs=nnx.Rngs(0))
    y, aux = attn(x, positions=positions, segment_ids=segment_ids)
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from arch.common import Linear, check_choice, dtype_of, zeros_param
from arch.dropout import make_attention_dropout
from arch.norms import RMSNorm
from arch.positional import POSITION_EMBEDDINGS, RoPE, rotary_dim
from pallas_kernels.flash_attention import IMPLS
from pallas_kernels.flash_attention.api import FULL_FEATURE_IMPLS, impl_lacks
from pallas_kernels.flash_attention.reference import max_logits_reference
from sharding import sequence as sequence_parallel

LAYER_KINDS = ("global", "local", "nope", "chunked")
# Layer kinds without attention, which the attention checks pass over: "mamba" (a Mamba-2
# mixer, arch/ssm.py) and "mlp" (a feed-forward alone: Nemotron-H, arch/block.py).
OTHER_KINDS = ("mamba", "mlp")


def layer_kind(cfg, layer_idx: int) -> str:
    """The kind of a layer (attention kinds, or OTHER_KINDS): `layer_pattern` repeated over the layers."""
    pattern = tuple(cfg.layer_pattern)
    return pattern[layer_idx % len(pattern)]


def validate_attention_config(cfg, kinds=None) -> None:
    """Fail at construction, naming the field, for anything the layers cannot build.

    `kinds` are the layer kinds to check (default: those of `cfg.layer_pattern`).
    """
    kinds = tuple(cfg.layer_pattern) if kinds is None else tuple(kinds)
    if cfg.num_heads % cfg.num_kv_heads:
        raise ValueError(f"model.num_heads={cfg.num_heads} must be divisible by "
                         f"model.num_kv_heads={cfg.num_kv_heads}")
    check_choice("model.attention_impl", cfg.attention_impl, IMPLS)
    lacking = impl_lacks(cfg.attention_impl, [f for f, on in (
        ("logit_soft_cap", cfg.logit_soft_cap is not None), ("sinks", cfg.attention_sinks)) if on])
    if lacking:
        raise ValueError(f"model.attention_impl={cfg.attention_impl!r} (jax.nn.dot_product_attention) "
                         f"has no {lacking} (set by model.logit_soft_cap / model.attention_sinks); "
                         f"use one of {FULL_FEATURE_IMPLS}")
    check_choice("model.position_embedding", cfg.position_embedding, POSITION_EMBEDDINGS)
    for kind in kinds:
        check_choice("model.layer_pattern entry", kind, LAYER_KINDS + OTHER_KINDS)
    if "local" in kinds:
        w = cfg.sliding_window
        if not isinstance(w, int) or w < 1:
            raise ValueError(f"model.sliding_window={w!r} must be a positive int for 'local' layers")
        if w > cfg.max_seq_len:
            raise ValueError(f"model.sliding_window={w} must not exceed model.max_seq_len={cfg.max_seq_len}")
    if "chunked" in kinds:
        c = cfg.chunk_size
        if not isinstance(c, int) or c < 1:
            raise ValueError(f"model.chunk_size={c!r} must be a positive int for 'chunked' layers")


def chunk_segment_ids(positions, segment_ids, chunk_size: int):
    """Chunked attention as segments: tokens meet only inside the same document and chunk."""
    chunk = positions // chunk_size
    if segment_ids is None:
        return chunk + 1
    return segment_ids * (jnp.max(chunk) + 1) + chunk + 1


class Attention(nnx.Module):
    """Self-attention (or cross-attention with `kv_input`) over [B, T, D] activations."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, layer_kind: str = "global", cross: bool = False):
        check_choice("layer_kind", layer_kind, LAYER_KINDS)
        validate_attention_config(cfg, kinds=tuple(cfg.layer_pattern) + (layer_kind,))
        self.cfg, self.kind, self.cross = cfg, layer_kind, cross
        h, hkv, dh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model
        kw = dict(rngs=rngs, std=cfg.init_std, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype),
                  precision=cfg.get("matmul_precision", "bf16"))
        self.q = Linear(d, (h, dh), in_axes=("embed",), out_axes=("heads", "head_dim"), use_bias=cfg.attn_bias, **kw)
        self.k = Linear(d, (hkv, dh), in_axes=("embed",), out_axes=("kv_heads", "head_dim"), use_bias=cfg.attn_bias, **kw)
        self.v = Linear(d, (hkv, dh), in_axes=("embed",), out_axes=("kv_heads", "head_dim"), use_bias=cfg.attn_bias, **kw)
        self.o = Linear((h, dh), d, in_axes=("heads", "head_dim"), out_axes=("embed",), use_bias=cfg.attn_out_bias, **kw)
        q_norm = k_norm = None
        if cfg.qk_norm:
            if cfg.qk_norm_per_head:  # Qwen 3, Gemma 3: one scale of head_dim shared by heads
                q_norm = RMSNorm(dh, eps=cfg.norm_eps, unit_offset=cfg.rmsnorm_unit_offset, axis_name="head_dim")
                k_norm = RMSNorm(dh, eps=cfg.norm_eps, unit_offset=cfg.rmsnorm_unit_offset, axis_name="head_dim")
            else:  # OLMo 2: normalise all heads jointly
                q_norm = RMSNorm(h * dh, eps=cfg.norm_eps, axis_name="heads")
                k_norm = RMSNorm(hkv * dh, eps=cfg.norm_eps, axis_name="kv_heads")
        self.q_norm, self.k_norm = q_norm, k_norm
        self.sinks = zeros_param((h,), ("heads",)) if cfg.attention_sinks else None
        use_rope = cfg.position_embedding == "rope" and layer_kind != "nope" and not cross
        self.rope = RoPE(cfg, rotary_dim(dh, cfg.rope_fraction), local=layer_kind == "local") if use_rope else None
        self.attn_dropout = make_attention_dropout(cfg, rngs)  # on the probabilities, in the kernel

    def _norm_heads(self, norm, x):
        if norm is None:
            return x
        if self.cfg.qk_norm_per_head:
            return norm(x)
        b, t, h, d = x.shape
        return norm(x.reshape(b, t, h * d)).reshape(b, t, h, d)

    def __call__(self, x, *, positions, segment_ids=None, cache=None, kv_input=None, kv_segment_ids=None):
        cfg = self.cfg
        if cache is not None and self.cross:
            raise ValueError("cache must be None for cross-attention (only self-attention is cached)")
        if cache is not None and not hasattr(cache, "attend"):
            raise ValueError(f"cache must be None or a layer cache of serving/cache.py, got {type(cache)}")
        kv_x = x if kv_input is None else kv_input
        q = self._norm_heads(self.q_norm, self.q(x))      # [B, T, H, Dh]
        k = self._norm_heads(self.k_norm, self.k(kv_x))   # [B, S, Hkv, Dh]
        v = self.v(kv_x)                                  # [B, S, Hkv, Dh]
        if self.rope is not None:
            q, k = self.rope(q, positions), self.rope(k, positions)
        seg = segment_ids
        if self.cross:
            seg = None if segment_ids is None else (segment_ids, kv_segment_ids)
        elif self.kind == "chunked":
            seg = chunk_segment_ids(positions, segment_ids, cfg.chunk_size)
        causal = cfg.causal and not self.cross
        window = cfg.sliding_window if self.kind == "local" else None
        sm_scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        sinks = None if self.sinks is None else self.sinks[...]
        aux = {}
        if cache is not None:  # decoding: the cache (serving/cache.py) stores k, v and attends
            o, aux["cache"] = cache.attend(
                q, k, v, positions=positions, segment_ids=segment_ids, causal=causal,
                sliding_window=window, chunk_size=cfg.chunk_size if self.kind == "chunked" else None,
                logit_soft_cap=cfg.logit_soft_cap, sm_scale=sm_scale, sinks=sinks,
                impl=cfg.attention_impl)
            return self.o(o), aux
        impl, pos = cfg.attention_impl, {}
        if not self.cross and sequence_parallel.attention_impl(impl) == "ring":
            # Context parallelism: tokens may sit in striped order, so masks use true positions.
            impl, pos = "ring", dict(q_positions=positions, kv_positions=positions)
        drop = {} if self.attn_dropout is None else self.attn_dropout.kernel_args()
        o = pallas_kernels.attention(
            q, k, v, causal=causal, sliding_window=window, segment_ids=seg,
            logit_soft_cap=cfg.logit_soft_cap, sm_scale=sm_scale,
            sinks=sinks, impl=impl, **pos, **drop)
        if cfg.track_max_logits:
            aux["max_logits"] = max_logits_reference(
                q, k, causal=causal, sliding_window=window, segment_ids=seg, sm_scale=sm_scale, **pos)
        return self.o(o), aux
