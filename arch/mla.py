"""Multi-head Latent Attention (MLA): DeepSeek-V2 (arXiv:2405.04434), DeepSeek-V3, Kimi K2.

Keys and values of all heads are reconstructed from one small latent per token, so a
decoder caches only the latent c_KV [kv_lora_rank] and one shared RoPE key k_R
[qk_rope_head_dim] instead of 2 * heads * head_dim numbers. With h the input (paper §2.1.2):

    c_Q = RMSNorm(W_DQ h)                 wq_a, q_norm   (or no c_Q: q = W_Q h, `wq`)
    [q_C, q_R] = W_UQ c_Q                 wq_b           per head: nope part, rope part
    [c_KV, k_R] = W_DKV h                 wkv_a          k_R is shared by every head
    c_KV = RMSNorm(c_KV)                  kv_norm
    [k_C, v] = W_UKV c_KV                 wkv_b          per head: W_UK, W_UV
    q = [q_C, RoPE(q_R)],  k = [k_C, RoPE(k_R)]
    o = softmax(q.k * scale) v;  y = W_O o                wo

Two forms of the same attention live side by side in `mla_attention`:

  naive     materialise per-head k [B,S,H,nope+rope] and v [B,S,H,v] and run ordinary
            multi-head attention (training and prefill: cheap per score).
  absorbed  fold W_UK into the query, q_lat = q_C W_UK^T [B,T,H,kv_lora_rank], so that
            q.k = q_lat.c_KV + q_R.k_R: attention over the latent is MQA with one kv head
            of dim kv_lora_rank + rope; the weighted latent is expanded by W_UV after
            the softmax (decode from the latent cache: nothing per-head is cached).

The softmax scale is qk_head_dim^-0.5 (qk_head_dim = nope + rope), times
yarn_mscale(factor, mscale_all_dim)^2 when `rope_scaling` has `mscale_all_dim`, exactly as
Hugging Face `DeepseekV3Attention` (DeepSeek-V3: factor 40, mscale_all_dim 1).

RoPE pairing: DeepSeek checkpoints rotate adjacent feature pairs (2i, 2i+1). HF's
`apply_rotary_pos_emb_interleave` permutes those pairs into halves and then rotates
halves; q and k are permuted alike, so every q.k equals rotating the pairs in place, which
is `apply_rope(..., interleaved=True)`. Load DeepSeek weights with `rope_interleaved=True`.

Parameter layout (HF name in brackets) loads HF weights by reshape:
  wq_a [embed, q_lora] (q_a_proj), q_norm (q_a_layernorm), wq_b [q_lora, H, nope+rope]
  (q_b_proj), or wq [embed, H, nope+rope] (q_proj); wkv_a [embed, kv_lora+rope]
  (kv_a_proj_with_mqa), kv_norm (kv_a_layernorm), wkv_b [kv_lora, H, nope+v] (kv_b_proj),
  wo [H, v, embed] (o_proj). QK-Clip rescales the q_C, q_R and k_C columns per head,
  never the shared k_R. `attn_bias` puts biases on wq_a and wkv_a and `attn_out_bias` on
  wo (HF's single `attention_bias` sets all three); wq, wq_b and wkv_b have none, as in HF.
  The decoupled RoPE part is always rotated, whatever `position_embedding` says.

Example:

    import jax.numpy as jnp
    from flax import nnx
    from configs.base import model_defaults, mla_defaults
    from arch.mla import MLAttention

    cfg = model_defaults()
    cfg.mla = mla_defaults()
    layer = MLAttention(cfg, rngs=nnx.Rngs(params=0))
    x = jnp.ones((2, 8, cfg.d_model))
    y, aux = layer(x, positions=jnp.broadcast_to(jnp.arange(8), (2, 8)))   # y: [2, 8, 64]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from arch.common import Linear, check_choice, dtype_of
from arch.dropout import make_attention_dropout
from arch.norms import RMSNorm
from arch.positional import RoPE, yarn_mscale
from pallas_kernels.flash_attention.reference import max_logits_reference

LAYER_KINDS = ("global", "local")
_DIM_FIELDS = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


# ---------------------------------------------------------------------------- config


def validate_mla_config(cfg) -> None:
    """ValueError naming the MLA field when `cfg.mla` is missing or has bad dims."""
    mla = cfg.get("mla")
    if mla is None:
        raise ValueError(
            "model.mla must be a dict with fields q_lora_rank, " + ", ".join(_DIM_FIELDS)
        )
    for name in _DIM_FIELDS:
        value = mla.get(name)
        if value is None:
            raise ValueError(f"model.mla.{name} is missing; it must be a positive int")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model.mla.{name}={value!r} must be a positive int")
    rope = mla.get("qk_rope_head_dim")
    if rope % 2:
        raise ValueError(f"model.mla.qk_rope_head_dim={rope} must be even (RoPE rotates pairs)")
    q_lora = mla.get("q_lora_rank")
    if q_lora is not None and (
        isinstance(q_lora, bool) or not isinstance(q_lora, int) or q_lora < 1
    ):
        raise ValueError(
            f"model.mla.q_lora_rank={q_lora!r} must be None (full-rank query) or a positive int"
        )
    absorb = mla.get("absorb", False)
    if not isinstance(absorb, bool):
        raise ValueError(f"model.mla.absorb={absorb!r} must be True or False")
    if cfg.num_heads < 1:
        raise ValueError(f"model.num_heads={cfg.num_heads} must be a positive int")
    if cfg.get("attention_sinks", False):
        raise ValueError("model.attention_sinks=True is not supported with MLA; must be False")
    if cfg.get("qk_norm", False):
        raise ValueError(
            "model.qk_norm=True is not supported with MLA (MLA normalises the latents); must be False"
        )


def mla_softmax_scale(qk_head_dim: int, rope_scaling=None) -> float:
    """qk_head_dim^-0.5, times yarn_mscale(factor, mscale_all_dim)^2 as in HF DeepseekV3Attention.

    With YaRN the cos/sin already carry mscale / mscale_all_dim (see arch/positional.py);
    DeepSeek moves the mscale_all_dim part of the temperature into the softmax scale.
    """
    scale = qk_head_dim**-0.5
    if rope_scaling and rope_scaling.get("mscale_all_dim"):
        m = yarn_mscale(float(rope_scaling["factor"]), float(rope_scaling["mscale_all_dim"]))
        scale = scale * m * m
    return scale


# ---------------------------------------------------------------------------- the two forms


def naive_qkv(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv):
    """Per-head q, k, v for ordinary MHA.

    Args:
      q_nope: [B, T, H, nope] query without RoPE (q_C).
      q_pe: [B, T, H, rope] rotated query RoPE part (q_R).
      c_kv: [B, S, C] normalised latent (what a latent cache holds).
      k_pe: [B, S, rope] rotated shared RoPE key (k_R).
      w_uk: [C, H, nope] up-projection of the keys (first `nope` outputs of wkv_b).
      w_uv: [C, H, v] up-projection of the values (last `v` outputs of wkv_b).

    Returns:
      q [B, T, H, nope+rope], k [B, S, H, nope+rope], v [B, S, H, v].
    """
    heads = q_nope.shape[2]
    k_nope = jnp.einsum("bsc,chn->bshn", c_kv, w_uk)  # [B, S, H, nope]
    v = jnp.einsum("bsc,chv->bshv", c_kv, w_uv)  # [B, S, H, v]
    b, s, rope = k_pe.shape
    k_pe = jnp.broadcast_to(k_pe[:, :, None, :], (b, s, heads, rope))  # no copy under jit
    q = jnp.concatenate([q_nope, q_pe], axis=-1)
    k = jnp.concatenate([k_nope, k_pe.astype(k_nope.dtype)], axis=-1)
    return q, k, v


def absorbed_qkv(q_nope, q_pe, c_kv, k_pe, w_uk):
    """MQA over the latent: W_UK folded into the query (arguments as in `naive_qkv`).

    q.k = q_C . (W_UK c_KV) + q_R . k_R = (q_C W_UK^T) . c_KV + q_R . k_R.

    Returns:
      q [B, T, H, C+rope], k [B, S, 1, C+rope], v [B, S, 1, C] (v is the latent itself).
    """
    q_lat = jnp.einsum("bthn,chn->bthc", q_nope, w_uk)  # [B, T, H, C]
    q = jnp.concatenate([q_lat, q_pe.astype(q_lat.dtype)], axis=-1)
    k = jnp.concatenate([c_kv, k_pe.astype(c_kv.dtype)], axis=-1)  # [B, S, C+rope]
    k = k[:, :, None, :]  # [B, S, 1, C+rope]: one kv head shared by all query heads
    v = c_kv[:, :, None, :]  # [B, S, 1, C]
    return q, k, v


def mla_attention(
    q_nope,
    q_pe,
    c_kv,
    k_pe,
    w_uk,
    w_uv,
    *,
    absorb: bool,
    sm_scale: float,
    causal: bool,
    sliding_window=None,
    segment_ids=None,
    q_positions=None,
    kv_positions=None,
    logit_soft_cap=None,
    impl: str = "auto",
    return_max_logits: bool = False,
    dropout: dict | None = None,
):
    """Attention from the MLA query parts and the latent KV, in either form.

    Inputs are as in `naive_qkv`; the key side is exactly what a latent cache stores
    ([B, S, C] latent + [B, S, rope] shared RoPE key), so decode calls this with
    `absorb=True`, q of length T=1 and the cache as c_kv / k_pe (with positions or a
    (q_seg, kv_seg) pair when T != S; see pallas_kernels/flash_attention/reference.py).

    Returns:
      o [B, T, H, v] (before the output projection), and max_logits [H] (per-head max
      scaled logit over kept pairs, gradient stopped) or None.
    """
    if absorb:
        q, k, v = absorbed_qkv(q_nope, q_pe, c_kv, k_pe, w_uk)
    else:
        q, k, v = naive_qkv(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv)
    mask_kw = dict(
        causal=causal,
        sliding_window=sliding_window,
        segment_ids=segment_ids,
        q_positions=q_positions,
        kv_positions=kv_positions,
    )
    # sm_scale is passed explicitly: the absorbed head dim C+rope is not the model's qk dim.
    o = pallas_kernels.attention(
        q, k, v, logit_soft_cap=logit_soft_cap, sm_scale=sm_scale, impl=impl, **mask_kw,
        **(dropout or {}),
    )
    if absorb:
        o = jnp.einsum("bthc,chv->bthv", o, w_uv)  # [B, T, H, v]
    max_logits = None
    if return_max_logits:
        # Same scores in either form; the absorbed one is MQA-grouped (one kv head).
        max_logits = max_logits_reference(
            jax.lax.stop_gradient(q), jax.lax.stop_gradient(k), sm_scale=sm_scale, **mask_kw
        )
    return o, max_logits


# ---------------------------------------------------------------------------- the layer


class MLAttention(nnx.Module):
    """Multi-head latent attention layer (see the module docstring for the equations).

    Args:
      cfg: model config (configs/base.py `model_defaults()` with `mla` set).
      rngs: parameter RNGs.
      layer_kind: "global" (full causal attention) or "local" (sliding window
        `cfg.sliding_window`, local RoPE base).
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs, layer_kind: str = "global"):
        validate_mla_config(cfg)
        check_choice("layer_kind", layer_kind, LAYER_KINDS)
        if layer_kind == "local" and not cfg.sliding_window:
            raise ValueError(
                f"model.sliding_window={cfg.sliding_window} must be a positive int for local layers"
            )
        mla = cfg.mla
        self.heads, self.d_model = cfg.num_heads, cfg.d_model
        self.q_lora_rank, self.kv_lora_rank = mla.q_lora_rank, mla.kv_lora_rank
        self.nope = mla.qk_nope_head_dim
        self.rope_dim = mla.qk_rope_head_dim
        self.v_dim = mla.v_head_dim
        self.qk_head_dim = self.nope + self.rope_dim
        self.absorb = mla.get("absorb", False)
        self.causal, self.impl = cfg.causal, cfg.attention_impl
        self.sliding_window = cfg.sliding_window if layer_kind == "local" else None
        self.logit_soft_cap = cfg.logit_soft_cap
        self.track_max_logits = cfg.track_max_logits
        self.dtype = dtype_of(cfg.dtype)
        self.rope = RoPE(cfg, self.rope_dim, local=layer_kind == "local")
        self.sm_scale = mla_softmax_scale(self.qk_head_dim, cfg.rope_scaling)
        self.attn_dropout = make_attention_dropout(cfg, rngs)  # on the probabilities, in the kernel

        h, d = self.heads, self.d_model
        kw = dict(
            rngs=rngs, std=cfg.init_std, dtype=self.dtype, param_dtype=dtype_of(cfg.param_dtype),
            precision=cfg.get("matmul_precision", "bf16"),
        )
        in_bias = dict(use_bias=cfg.attn_bias)
        if self.q_lora_rank is None:
            self.wq = Linear(
                d, (h, self.qk_head_dim), in_axes=("embed",), out_axes=("heads", "head_dim"), **kw
            )
        else:
            self.wq_a = Linear(
                d, self.q_lora_rank, in_axes=("embed",), out_axes=("latent",), **in_bias, **kw
            )
            self.q_norm = RMSNorm(self.q_lora_rank, eps=cfg.norm_eps, axis_name="latent")
            self.wq_b = Linear(
                self.q_lora_rank,
                (h, self.qk_head_dim),
                in_axes=("latent",),
                out_axes=("heads", "head_dim"),
                **kw,
            )
        self.wkv_a = Linear(
            d,
            self.kv_lora_rank + self.rope_dim,
            in_axes=("embed",),
            out_axes=("latent",),
            **in_bias,
            **kw,
        )
        self.kv_norm = RMSNorm(self.kv_lora_rank, eps=cfg.norm_eps, axis_name="latent")
        self.wkv_b = Linear(
            self.kv_lora_rank,
            (h, self.nope + self.v_dim),
            in_axes=("latent",),
            out_axes=("heads", "head_dim"),
            **kw,
        )
        self.wo = Linear(
            (h, self.v_dim),
            d,
            in_axes=("heads", "head_dim"),
            out_axes=("embed",),
            use_bias=cfg.attn_out_bias,
            **kw,
        )

    # Pieces that the serving code reuses: query parts, latent KV, up-projection weights.

    def query(self, x, positions):
        """x [B, T, D] -> q_nope [B, T, H, nope], rotated q_pe [B, T, H, rope]."""
        if self.q_lora_rank is None:
            q = self.wq(x)  # [B, T, H, nope+rope]
        else:
            q = self.wq_b(self.q_norm(self.wq_a(x)))  # [B, T, H, nope+rope]
        q_nope, q_pe = q[..., : self.nope], q[..., self.nope :]
        return q_nope, self.rope(q_pe, positions)

    def latent_kv(self, x, positions):
        """x [B, T, D] -> normalised latent c_kv [B, T, C], rotated shared key k_pe [B, T, rope]."""
        kv = self.wkv_a(x)  # [B, T, C+rope]
        c_kv = self.kv_norm(kv[..., : self.kv_lora_rank])
        k_pe = kv[..., self.kv_lora_rank :][:, :, None, :]  # [B, T, 1, rope]: one shared head
        k_pe = self.rope(k_pe, positions)[:, :, 0, :]  # [B, T, rope]
        return c_kv, k_pe

    def up_weights(self):
        """W_UK [C, H, nope], W_UV [C, H, v] in the compute dtype (split of wkv_b's kernel)."""
        w = self.wkv_b.kernel[...].astype(self.dtype)  # [C, H, nope+v]
        return w[..., : self.nope], w[..., self.nope :]

    def __call__(self, x, *, positions, segment_ids=None, cache=None, absorb: bool | None = None):
        """Self-attention over x [B, T, D]; returns (y [B, T, D], aux dict).

        Args:
          positions: [B, T] token positions (RoPE).
          segment_ids: [B, T] packed-document ids (0 = padding) or None.
          cache: None, or this layer's latent cache (serving/cache.py): the new c_kv
            and k_pe are written to it and attention runs over all cached tokens;
            the updated cache is returned in aux["cache"].
          absorb: override `cfg.mla.absorb` for this call. Default with a cache:
            absorbed for decode (one token per row), as DeepSeek-V2 serves it.

        Masks (causal, sliding window) use token order and `segment_ids`, as the dense
        attention layer does; `positions` only drive RoPE (with a cache, masks compare
        the positions of queries and cached keys).
        """
        if cache is not None and not hasattr(cache, "attend"):
            raise ValueError(f"cache must be None or a layer cache of serving/cache.py, got {type(cache)}")
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be [batch, seq, d_model={self.d_model}], got {x.shape=}")
        if positions.shape != x.shape[:2]:
            raise ValueError(
                f"positions must be [batch, seq]={x.shape[:2]}, got {positions.shape=}"
            )
        if segment_ids is not None and segment_ids.shape != x.shape[:2]:
            raise ValueError(
                f"segment_ids must be [batch, seq]={x.shape[:2]}, got {segment_ids.shape=}"
            )
        if absorb is None:
            absorb = self.absorb or (cache is not None and x.shape[1] == 1)

        q_nope, q_pe = self.query(x, positions)
        c_kv, k_pe = self.latent_kv(x, positions)
        w_uk, w_uv = self.up_weights()
        aux, mask_kw = {}, dict(segment_ids=segment_ids)
        if cache is not None:  # the cache stores c_kv as its k [B,S,1,C] and k_pe as its v [B,S,1,rope]
            aux["cache"], view = cache.update(c_kv[:, :, None], k_pe[:, :, None],
                                              positions=positions, segment_ids=segment_ids)
            c_kv, k_pe = view.k[:, :, 0], view.v[:, :, 0]
            mask_kw = view.mask_kwargs()
        o, max_logits = mla_attention(
            q_nope,
            q_pe,
            c_kv,
            k_pe,
            w_uk,
            w_uv,
            absorb=absorb,
            sm_scale=self.sm_scale,
            causal=self.causal,
            sliding_window=self.sliding_window,
            logit_soft_cap=self.logit_soft_cap,
            impl=self.impl,
            return_max_logits=self.track_max_logits and cache is None,
            dropout=None if self.attn_dropout is None else self.attn_dropout.kernel_args(),
            **mask_kw,
        )
        y = self.wo(o)  # [B, T, D]
        if max_logits is not None:
            aux["max_logits"] = max_logits
        return y, aux
