"""Which Hugging Face tensor fills which of our parameters, and how it is reshaped.

One `Entry` ties a piece of one HF tensor to a piece of one of our parameters:

  torch Linear     weight [out, in]          -> our kernel [*in_shape, *out_shape] (transpose)
  GPT-2 Conv1D     weight [in, out]          -> our kernel (reshape only); c_attn [D, 3D]
                                                is split into q, k, v (`split`)
  per-expert       experts.{j}.w1 [F, D]     -> slot j of our stacked w_gate [E, D, F] (`index`)
  norms, biases    [n]                       -> [n] or [heads, head_dim]

`to_ours` and `to_hf` use only array methods (`.T`, `.reshape`), so they run on numpy
arrays, jax arrays and abstract shapes alike (`jax.eval_shape` gives the HF shape that a
checkpoint must have without allocating anything).

Family differences are few: MLP / attention names are shared by the Llama-like models;
Mixtral names its experts w1/w3/w2 under `block_sparse_moe`; Gemma 3 and OLMo 2 differ
in which norms exist (sandwich vs output-only); DeepSeek-V3 has MLA projections, shared
experts and the router's `e_score_correction_bias` (our RouterBias); GPT-2 and Mamba-2
(`backbone.layers.{i}.mixer`: one fused in_proj, a depthwise Conv1d) are their own.
Gemma's (1 + w) RMSNorm weights are stored as w by both sides, so they copy unchanged,
and DeepSeek's interleaved RoPE pairs need no permutation (see arch/mla.py).

    from arch.hf_names import tensor_entries
    entries = tensor_entries(cfg.model)      # [Entry(hf="model.embed_tokens.weight", ...), ...]
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

Path = tuple


@dataclass(frozen=True)
class Entry:
    hf: str                              # canonical HF tensor name
    ours: Path                           # path of our parameter in the nnx state
    to_ours: Callable                    # HF piece -> our piece
    to_hf: Callable                      # our piece -> HF piece
    index: int | None = None             # our piece is slot `index` on axis 0 (stacked experts)
    split: tuple[int, int, int] | None = None  # HF piece is tensor[start:stop] on `axis`


def _same(x):
    return x


def linear(in_shape: tuple, out_shape: tuple):
    """torch nn.Linear weight [out, in] <-> our kernel [*in_shape, *out_shape]."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    return (lambda w: w.T.reshape(in_shape + out_shape),        # [in, out] -> [*in, *out]
            lambda k: k.reshape(n_in, n_out).T)                 # [*in, *out] -> [out, in]


def conv1d(in_shape: tuple, out_shape: tuple):
    """GPT-2 Conv1D weight [in, out] <-> our kernel [*in_shape, *out_shape]."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    return (lambda w: w.reshape(in_shape + out_shape), lambda k: k.reshape(n_in, n_out))


def depthwise_conv():
    """torch Conv1d(groups=C) weight [C, 1, K] <-> our conv_weight [K, C] (arch/ssm.py)."""
    return (lambda w: w.reshape(w.shape[0], w.shape[2]).T,
            lambda k: k.T.reshape(k.shape[1], 1, k.shape[0]))


def vector(shape: tuple):
    """A bias [prod(shape)] <-> our bias [*shape]."""
    return (lambda b: b.reshape(shape), lambda b: b.reshape(-1))


def _e(hf, ours, fns=(_same, _same), **kw) -> Entry:
    return Entry(hf, tuple(ours), fns[0], fns[1], **kw)


# ---------------------------------------------------------------------------- pieces


def _attention(m, p: str, o: Path) -> list[Entry]:
    """q/k/v/o projections (+ biases, + QK-norm) of a Llama-like layer."""
    d, h, kv, dh = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim
    a = p + "self_attn."
    out = []
    for name, heads in (("q", h), ("k", kv), ("v", kv)):
        out.append(_e(f"{a}{name}_proj.weight", o + ("attn", name, "kernel"), linear((d,), (heads, dh))))
        if m.attn_bias:
            out.append(_e(f"{a}{name}_proj.bias", o + ("attn", name, "bias"), vector((heads, dh))))
    out.append(_e(f"{a}o_proj.weight", o + ("attn", "o", "kernel"), linear((h, dh), (d,))))
    if m.attn_out_bias:
        out.append(_e(f"{a}o_proj.bias", o + ("attn", "o", "bias")))
    if m.qk_norm:
        out.append(_e(f"{a}q_norm.weight", o + ("attn", "q_norm", "scale")))
        out.append(_e(f"{a}k_norm.weight", o + ("attn", "k_norm", "scale")))
    return out


def _mla(m, p: str, o: Path) -> list[Entry]:
    """DeepSeek-V3 multi-head latent attention (arch/mla.py lists the layout)."""
    d, h, mla = m.d_model, m.num_heads, m.mla
    qk = mla.qk_nope_head_dim + mla.qk_rope_head_dim
    a, t = p + "self_attn.", o + ("attn",)
    out = []
    if mla.q_lora_rank is None:
        out.append(_e(a + "q_proj.weight", t + ("wq", "kernel"), linear((d,), (h, qk))))
    else:
        r = mla.q_lora_rank
        out.append(_e(a + "q_a_proj.weight", t + ("wq_a", "kernel"), linear((d,), (r,))))
        if m.attn_bias:
            out.append(_e(a + "q_a_proj.bias", t + ("wq_a", "bias")))
        out.append(_e(a + "q_a_layernorm.weight", t + ("q_norm", "scale")))
        out.append(_e(a + "q_b_proj.weight", t + ("wq_b", "kernel"), linear((r,), (h, qk))))
    c = mla.kv_lora_rank
    out.append(_e(a + "kv_a_proj_with_mqa.weight", t + ("wkv_a", "kernel"),
                  linear((d,), (c + mla.qk_rope_head_dim,))))
    if m.attn_bias:
        out.append(_e(a + "kv_a_proj_with_mqa.bias", t + ("wkv_a", "bias")))
    out.append(_e(a + "kv_a_layernorm.weight", t + ("kv_norm", "scale")))
    out.append(_e(a + "kv_b_proj.weight", t + ("wkv_b", "kernel"),
                  linear((c,), (h, mla.qk_nope_head_dim + mla.v_head_dim))))
    out.append(_e(a + "o_proj.weight", t + ("wo", "kernel"), linear((h, mla.v_head_dim), (d,))))
    if m.attn_out_bias:
        out.append(_e(a + "o_proj.bias", t + ("wo", "bias")))
    return out


def _mlp(m, p: str, o: Path, width: int) -> list[Entry]:
    """A dense gated MLP: gate_proj, up_proj, down_proj."""
    d = m.d_model
    out = [_e(p + "gate_proj.weight", o + ("gate", "kernel"), linear((d,), (width,))),
           _e(p + "up_proj.weight", o + ("up", "kernel"), linear((d,), (width,))),
           _e(p + "down_proj.weight", o + ("down", "kernel"), linear((width,), (d,)))]
    if m.mlp_bias:
        out += [_e(p + f"{n}_proj.bias", o + (n, "bias")) for n in ("gate", "up", "down")]
    return out


def _moe(m, p: str, o: Path) -> list[Entry]:
    """Router, stacked routed experts, shared experts and router bias of one MoE layer."""
    d, e, f = m.d_model, m.moe.num_experts, m.moe.expert_mlp_dim
    mixtral = m.family == "mixtral"
    g = p + ("block_sparse_moe." if mixtral else "mlp.")
    o = o + ("mlp",)
    names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    out = [_e(g + "gate.weight", o + ("router", "kernel"), linear((d,), (e,)))]
    for j in range(e):
        x = f"{g}experts.{j}."
        out += [_e(f"{x}{names[0]}.weight", o + ("w_gate",), linear((d,), (f,)), index=j),
                _e(f"{x}{names[1]}.weight", o + ("w_up",), linear((d,), (f,)), index=j),
                _e(f"{x}{names[2]}.weight", o + ("w_down",), linear((f,), (d,)), index=j)]
    if m.moe.num_shared_experts:
        width = m.moe.num_shared_experts * (m.moe.shared_mlp_dim or f)
        out += _mlp(m, g + "shared_experts.", o + ("shared",), width)
    if m.moe.bias_update_rate > 0:
        out.append(_e(g + "gate.e_score_correction_bias", o + ("router_bias",)))
    return out


_NORMS = {  # our norm attribute -> HF norm name, per placement
    "pre": {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
    "sandwich": {"attn_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
                 "mlp_norm": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm"},
    "olmo2": {"post_attn_norm": "post_attention_layernorm", "post_mlp_norm": "post_feedforward_layernorm"},
}


def _decoder(m) -> list[Entry]:
    from arch.block import is_moe_layer

    if m.norm_placement not in _NORMS:
        raise ValueError(f"model.norm_placement={m.norm_placement!r} has no Hugging Face layout; "
                         f"allowed: {tuple(_NORMS)}")
    out = [_e("model.embed_tokens.weight", ("embed", "embedding"))]
    for i in range(m.num_layers):
        p, o = f"model.layers.{i}.", ("stack", "layers", i)
        out += _mla(m, p, o) if m.mla is not None else _attention(m, p, o)
        if is_moe_layer(m, i):
            out += _moe(m, p, o)
        else:
            dense = m.moe.dense_mlp_dim if m.moe is not None and m.moe.dense_mlp_dim else m.mlp_dim
            out += _mlp(m, p + "mlp.", o + ("mlp",), dense)
        for ours, theirs in _NORMS[m.norm_placement].items():
            out.append(_e(f"{p}{theirs}.weight", o + (ours, "scale")))
    out.append(_e("model.norm.weight", ("final_norm", "scale")))
    if not m.tie_embeddings:
        out.append(_e("lm_head.weight", ("lm_head", "kernel"), linear((m.d_model,), (m.vocab_size,))))
    return out


def _gpt2(m) -> list[Entry]:
    d, h, dh, f = m.d_model, m.num_heads, m.head_dim, m.mlp_dim
    out = [_e("transformer.wte.weight", ("embed", "embedding")),
           _e("transformer.wpe.weight", ("pos_embed", "embedding"))]
    for i in range(m.num_layers):
        p, o = f"transformer.h.{i}.", ("stack", "layers", i)
        for ln, ours in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
            out += [_e(f"{p}{ln}.weight", o + (ours, "scale")), _e(f"{p}{ln}.bias", o + (ours, "bias"))]
        for j, name in enumerate("qkv"):  # c_attn = [q | k | v] on the output axis
            out.append(_e(p + "attn.c_attn.weight", o + ("attn", name, "kernel"), conv1d((d,), (h, dh)),
                          split=(1, j * d, (j + 1) * d)))
            out.append(_e(p + "attn.c_attn.bias", o + ("attn", name, "bias"), vector((h, dh)),
                          split=(0, j * d, (j + 1) * d)))
        out += [_e(p + "attn.c_proj.weight", o + ("attn", "o", "kernel"), conv1d((h, dh), (d,))),
                _e(p + "attn.c_proj.bias", o + ("attn", "o", "bias")),
                _e(p + "mlp.c_fc.weight", o + ("mlp", "up", "kernel"), conv1d((d,), (f,))),
                _e(p + "mlp.c_fc.bias", o + ("mlp", "up", "bias")),
                _e(p + "mlp.c_proj.weight", o + ("mlp", "down", "kernel"), conv1d((f,), (d,))),
                _e(p + "mlp.c_proj.bias", o + ("mlp", "down", "bias"))]
    out += [_e("transformer.ln_f.weight", ("final_norm", "scale")),
            _e("transformer.ln_f.bias", ("final_norm", "bias"))]
    if not m.tie_embeddings:
        out.append(_e("lm_head.weight", ("lm_head", "kernel"), linear((d,), (m.vocab_size,))))
    return out


def _mamba2(m) -> list[Entry]:
    """Mamba-2 (transformers' Mamba2ForCausalLM): one fused in_proj [z | x | B | C | dt],
    split into our five projections; the conv over (x, B, C) with its bias."""
    from arch.ssm import ssm_dims

    d = m.d_model
    h, p, g, n, _ = ssm_dims(m)
    out = [_e("backbone.embeddings.weight", ("embed", "embedding"))]
    for i in range(m.num_layers):
        x, o = f"backbone.layers.{i}.", ("stack", "layers", i)
        mx, t = x + "mixer.", o + ("mamba",)
        start = 0
        for name, shape in (("in_z", (h, p)), ("in_x", (h, p)), ("in_b", (g, n)), ("in_c", (g, n)),
                            ("in_dt", (h,))):
            size = math.prod(shape)
            out.append(_e(mx + "in_proj.weight", t + (name, "kernel"), linear((d,), shape),
                          split=(0, start, start + size)))
            start += size
        out += [_e(mx + "conv1d.weight", t + ("conv_weight",), depthwise_conv()),
                _e(mx + "conv1d.bias", t + ("conv_bias",)),
                _e(mx + "dt_bias", t + ("dt_bias",)), _e(mx + "A_log", t + ("A_log",)),
                _e(mx + "D", t + ("D",)), _e(mx + "norm.weight", t + ("norm", "scale")),
                _e(mx + "out_proj.weight", t + ("out", "kernel"), linear((h, p), (d,))),
                _e(x + "norm.weight", o + ("attn_norm", "scale"))]
    out.append(_e("backbone.norm_f.weight", ("final_norm", "scale")))
    if not m.tie_embeddings:
        out.append(_e("lm_head.weight", ("lm_head", "kernel"), linear((d,), (m.vocab_size,))))
    return out


def tensor_entries(m) -> list[Entry]:
    """Every (HF tensor piece, our parameter piece) pair of model config `m`."""
    return {"gpt2": _gpt2, "mamba2": _mamba2}.get(m.family, _decoder)(m)


# ---------------------------------------------------------------------------- checkpoint names


def canonical_name(name: str, m, hf: dict) -> str | None:
    """The canonical name of a checkpoint tensor, or None for tensors that are not weights
    of the language model and are skipped on purpose (each rule says why)."""
    if m.family == "gpt2":
        # The original OpenAI checkpoints have no "transformer." prefix and carry the causal
        # mask buffers attn.bias / attn.masked_bias (not parameters).
        if re.search(r"\.attn\.(masked_)?bias$", name):
            return None
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
    if hf.get("model_type") == "gemma3":  # multimodal: keep the language model only
        if name.startswith(("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                            "model.multi_modal_projector.")):
            return None
        for prefix in ("language_model.model.", "model.language_model."):
            if name.startswith(prefix):
                return "model." + name[len(prefix):]
        if name.startswith("language_model.lm_head."):
            name = name[len("language_model."):]
    if name.endswith("rotary_emb.inv_freq"):  # old checkpoints saved the RoPE buffer
        return None
    if m.tie_embeddings and name == "lm_head.weight":  # a saved copy of the tied table
        return None
    layer = re.match(r"model\.layers\.(\d+)\.", name)
    if (m.mla is not None and layer and int(layer.group(1)) >= m.num_layers
            and hf.get("num_nextn_predict_layers", 0)):
        return None  # DeepSeek-V3 multi-token-prediction module: not part of the LM
    return name
