"""Hugging Face `config.json` <-> our model config (configs/base.py), per family.

`from_hf(hf)` reads the dict of a `config.json` and returns a full `get_base_config()`
with `cfg.model` set from it; `to_hf(cfg.model)` writes the inverse. Both fail with a
ValueError naming the HF field when a value is one our modules do not implement (an
activation, a RoPE type, a layer type, a quantisation), so nothing loads with a silently
different forward pass.

Both RoPE spellings are read: transformers 4.x (`rope_theta`, `rope_scaling`) and 5.x
(`rope_parameters`, nested per layer type for Gemma 3); both are written.

    import json
    from arch.hf_config import from_hf, to_hf
    cfg = from_hf(json.load(open("config.json")))
    cfg.model.num_layers, to_hf(cfg.model)["model_type"]
"""
from __future__ import annotations

import math

import ml_collections as mlc

from configs.base import get_base_config, mla_defaults, moe_defaults, ssm_defaults

# HF model_type -> our family name (cfg.model.family); `save` maps back with FAMILY_TO_TYPE.
MODEL_TYPES = {
    "llama": "llama", "mistral": "mistral", "mixtral": "mixtral", "qwen2": "qwen25",
    "qwen3": "qwen3", "qwen3_moe": "qwen3_moe", "gemma3_text": "gemma3", "gemma3": "gemma3",
    "olmo2": "olmo2", "deepseek_v3": "deepseek_v3", "kimi_k2": "deepseek_v3", "gpt2": "gpt2",
    "smollm3": "smollm3", "mamba2": "mamba2",
}
FAMILY_TO_TYPE = {
    "llama": "llama", "mistral": "mistral", "mixtral": "mixtral", "qwen25": "qwen2",
    "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe", "gemma3": "gemma3_text",
    "olmo2": "olmo2", "deepseek_v3": "deepseek_v3", "kimi_k2": "deepseek_v3", "gpt2": "gpt2",
    "smollm3": "smollm3", "mamba2": "mamba2",
}
ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM", "olmo2": "Olmo2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM", "gpt2": "GPT2LMHeadModel",
    "smollm3": "SmolLM3ForCausalLM", "mamba2": "Mamba2ForCausalLM",
}
# HF layer_types -> our layer kinds (arch/attention.py LAYER_KINDS).
LAYER_TYPES = {"full_attention": "global", "sliding_attention": "local"}
GATED_ACTS = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu"}
GPT2_ACTS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def _fail(field, value, allowed) -> None:
    raise ValueError(f"config.json {field}={value!r} is not supported; allowed: {allowed}")


def _require(hf, field, allowed, default=None) -> None:
    """ValueError unless hf[field] (or its default) is one of `allowed`."""
    value = hf.get(field, default)
    if value not in allowed:
        _fail(field, value, tuple(allowed))


def _period(kinds: list[str]) -> tuple[str, ...]:
    """Shortest pattern p with kinds[i] == p[i % len(p)] (our layer_pattern repeats)."""
    for p in range(1, len(kinds) + 1):
        if all(kinds[i] == kinds[i % p] for i in range(len(kinds))):
            return tuple(kinds[:p])
    return tuple(kinds)


# ---------------------------------------------------------------------------- RoPE


def _rope_params(hf) -> dict:
    """One flat RoPE dict (rope_type, rope_theta, scaling fields) from either HF spelling."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    params.update({k: v for k, v in legacy.items() if k not in params})
    params.setdefault("rope_theta", hf.get("rope_theta", 10_000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def _rope_scaling(params: dict, hf: dict, field: str = "rope_scaling"):
    """HF rope parameters -> our `rope_scaling` dict (arch/positional.py) or None."""
    kind = params["rope_type"]
    if kind == "default":
        return None
    factor = params.get("factor")
    original = params.get("original_max_position_embeddings",
                          hf.get("original_max_position_embeddings", hf.get("max_position_embeddings")))
    if kind == "linear":
        return dict(type="linear", factor=float(factor))
    if kind == "dynamic":
        return dict(type="dynamic_ntk", factor=float(factor), original_max_position_embeddings=int(original))
    if kind == "llama3":
        return dict(type="llama3", factor=float(factor), low_freq_factor=float(params["low_freq_factor"]),
                    high_freq_factor=float(params["high_freq_factor"]),
                    original_max_position_embeddings=int(original))
    if kind == "yarn":
        if factor is None:  # DeepSeek-style: implied by the context extension
            factor = hf["max_position_embeddings"] / original
        out = dict(type="yarn", factor=float(factor), original_max_position_embeddings=int(original))
        for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
            if params.get(key) is not None:
                out[key] = float(params[key])
        if params.get("truncate") is not None:
            out["truncate"] = bool(params["truncate"])
        return out
    _fail(f"{field}.rope_type", kind, ("default", "linear", "dynamic", "llama3", "yarn"))


def _rope_to_hf(theta, scaling) -> dict:
    """Our (theta, rope_scaling) -> an HF rope_parameters dict."""
    out = {"rope_theta": float(theta), "rope_type": "default"}
    if scaling:
        s = dict(scaling)
        kind = {"dynamic_ntk": "dynamic"}.get(s.pop("type"), scaling["type"])
        if kind == "ntk":
            raise ValueError("model.rope_scaling.type='ntk' has no Hugging Face equivalent; "
                             "allowed for export: linear, dynamic_ntk, yarn, llama3")
        out.update(rope_type=kind, **s)
    return out


# ---------------------------------------------------------------------------- families


def _decoder_common(hf, m) -> None:
    """Fields every Llama-like decoder shares."""
    m.vocab_size = int(hf["vocab_size"])
    m.d_model = int(hf["hidden_size"])
    m.num_layers = int(hf["num_hidden_layers"])
    m.num_heads = int(hf["num_attention_heads"])
    m.num_kv_heads = int(hf.get("num_key_value_heads") or m.num_heads)
    m.head_dim = int(hf.get("head_dim") or m.d_model // m.num_heads)
    m.mlp_dim = int(hf["intermediate_size"])
    m.max_seq_len = int(hf.get("max_position_embeddings", 4096))
    m.norm, m.norm_eps = "rmsnorm", float(hf.get("rms_norm_eps", 1e-6))
    act_field = "hidden_activation" if "hidden_activation" in hf else "hidden_act"
    act = hf.get(act_field, "silu")
    if act not in GATED_ACTS:
        _fail(act_field, act, tuple(GATED_ACTS))
    m.activation = GATED_ACTS[act]
    m.mlp_bias = bool(hf.get("mlp_bias", False))
    m.attn_bias = m.attn_out_bias = bool(hf.get("attention_bias", False))
    _require(hf, "pretraining_tp", (1, None), 1)
    for field in ("attn_logit_softcapping", "final_logit_softcapping"):
        if hf.get(field) is not None and m.family != "gemma3":
            _fail(field, hf[field], (None,))
    params = _rope_params(hf)
    m.rope_theta = float(params["rope_theta"])
    m.rope_scaling = _rope_scaling(params, hf)
    if params.get("partial_rotary_factor") not in (None, 1.0):
        m.rope_fraction = float(params["partial_rotary_factor"])
    m.layer_pattern = _layer_pattern(hf, m)


def _layer_pattern(hf, m) -> tuple[str, ...]:
    """HF layer_types / sliding_window -> our layer_pattern (+ sliding_window)."""
    window = hf.get("sliding_window")
    if "use_sliding_window" in hf and not hf["use_sliding_window"]:
        window = None  # Qwen 2/3, SmolLM 3: the window only counts when switched on
    types = hf.get("layer_types")
    if types is None:
        if m.family == "qwen25" or m.family.startswith("qwen3"):
            start = hf.get("max_window_layers", 0)
            types = ["sliding_attention" if window and i >= start else "full_attention"
                     for i in range(m.num_layers)]
        else:
            types = ["sliding_attention" if window else "full_attention"] * m.num_layers
    for t in types:
        if t not in LAYER_TYPES:
            _fail("layer_types entry", t, tuple(LAYER_TYPES))
    if len(types) != m.num_layers:
        _fail("layer_types", types, f"a list of num_hidden_layers={m.num_layers} entries")
    kinds = [LAYER_TYPES[t] for t in types]
    if "local" in kinds:
        if not window:
            _fail("sliding_window", window, "a positive int when layer_types has sliding_attention")
        m.sliding_window = int(min(window, m.max_seq_len))  # a window past the context is global
    return _period(kinds)


def _moe_from(hf, m, **fields) -> None:
    m.moe = moe_defaults()
    m.moe.update(dispatch="dropless", aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.0) or 0.0),
                 **fields)


def _llama(hf, m) -> None:
    _decoder_common(hf, m)
    m.tie_embeddings = bool(hf.get("tie_word_embeddings", False))


def _qwen2(hf, m) -> None:
    _llama(hf, m)
    m.attn_bias, m.attn_out_bias = True, False  # Qwen 2: bias on q/k/v only, not a config field


def _qwen3(hf, m) -> None:
    _llama(hf, m)
    m.qk_norm, m.qk_norm_per_head = True, True


def _mixtral(hf, m) -> None:
    _llama(hf, m)
    experts = hf.get("num_local_experts", hf.get("num_experts"))
    _moe_from(hf, m, num_experts=int(experts), top_k=int(hf["num_experts_per_tok"]),
              expert_mlp_dim=m.mlp_dim, score_func="softmax", norm_topk_prob=True)


def _qwen3_moe(hf, m) -> None:
    _qwen3(hf, m)
    dense = sorted(hf.get("mlp_only_layers") or [])
    step = int(hf.get("decoder_sparse_step", 1))
    if dense != list(range(len(dense))) or (dense and step != 1):
        _fail("mlp_only_layers", dense, "a prefix [0, k) of the layers (with decoder_sparse_step=1)")
    experts = hf.get("num_experts", hf.get("num_local_experts"))  # transformers 5 writes the latter
    _moe_from(hf, m, num_experts=int(experts), top_k=int(hf["num_experts_per_tok"]),
              expert_mlp_dim=int(hf["moe_intermediate_size"]), score_func="softmax",
              norm_topk_prob=bool(hf.get("norm_topk_prob", False)), first_k_dense=len(dense),
              every=step)


def _gemma3(hf, m) -> None:
    hf = dict(hf)
    params = dict(hf.get("rope_parameters") or {})
    if "full_attention" in params or "sliding_attention" in params:  # transformers 5: per layer type
        hf["rope_parameters"] = params.get("full_attention") or {}
        local = dict(params.get("sliding_attention") or {})
    else:
        local = {"rope_theta": hf.get("rope_local_base_freq", 10_000.0), "rope_type": "default"}
    hf.setdefault("rope_theta", 1_000_000.0)
    _decoder_common(hf, m)
    _require(hf, "use_bidirectional_attention", (False, None), False)
    m.update(norm_placement="sandwich", rmsnorm_unit_offset=True, qk_norm=True, qk_norm_per_head=True,
             embed_scale=True, tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
             query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
             logit_soft_cap=hf.get("attn_logit_softcapping"),
             final_logit_soft_cap=hf.get("final_logit_softcapping"))
    if "layer_types" not in hf:  # older configs: every n-th layer global
        n = int(hf.get("sliding_window_pattern", 6))
        hf["layer_types"] = ["sliding_attention" if (i + 1) % n else "full_attention"
                             for i in range(m.num_layers)]
        m.layer_pattern = _layer_pattern(hf, m)
    local.setdefault("rope_type", local.get("type", "default"))
    m.rope_local_theta = float(local.get("rope_theta", 10_000.0))
    local_scaling = _rope_scaling(local, hf, "rope_parameters.sliding_attention")
    if local_scaling is not None:
        if local_scaling != (m.rope_scaling.to_dict() if m.rope_scaling else None):
            _fail("rope_parameters.sliding_attention", local,
                  "default, or the same scaling as full_attention")
        m.rope_local_scaling = True


def _olmo2(hf, m) -> None:
    _llama(hf, m)
    m.update(norm_placement="olmo2", qk_norm=True, qk_norm_per_head=False)


def _smollm3(hf, m) -> None:
    _llama(hf, m)
    m.tie_embeddings = bool(hf.get("tie_word_embeddings", True))
    n = int(hf.get("no_rope_layer_interval", 4))
    use_rope = hf.get("no_rope_layers") or [int((i + 1) % n != 0) for i in range(m.num_layers)]
    kinds = list(m.layer_pattern) * m.num_layers
    kinds = kinds[: m.num_layers]
    for i, rope in enumerate(use_rope):
        if not rope:
            if kinds[i] == "local":
                _fail("no_rope_layers", use_rope, "NoPE only on full-attention layers")
            kinds[i] = "nope"
    m.layer_pattern = _period(kinds)


def fp8_block_size(hf: dict) -> tuple[int, int] | None:
    """(rows, cols) of the weight blocks of an FP8 checkpoint (DeepSeek-V3, Kimi K2), or
    None for an unquantised one; ValueError for a quantisation we cannot read."""
    qc = hf.get("quantization_config")
    if not qc:
        return None
    if qc.get("quant_method") != "fp8" or qc.get("fmt", "e4m3") != "e4m3":
        _fail("quantization_config", {k: qc.get(k) for k in ("quant_method", "fmt")},
              "none, or quant_method 'fp8' with fmt 'e4m3' and weight_block_size (DeepSeek-V3)")
    block = qc.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2
            and all(isinstance(b, int) and b > 0 for b in block)):
        _fail("quantization_config.weight_block_size", block, "two positive ints, e.g. [128, 128]")
    return tuple(block)


def _deepseek_v3(hf, m) -> None:
    fp8_block_size(hf)  # FP8 weights are dequantised on load (arch/hf.py); others refused
    hf = dict(hf, intermediate_size=hf.get("intermediate_size"))
    m.vocab_size = int(hf["vocab_size"])
    m.d_model = int(hf["hidden_size"])
    m.num_layers = int(hf["num_hidden_layers"])
    m.num_heads = m.num_kv_heads = int(hf["num_attention_heads"])
    m.mlp_dim = int(hf["intermediate_size"])
    m.max_seq_len = int(hf.get("max_position_embeddings", 4096))
    m.norm, m.norm_eps = "rmsnorm", float(hf.get("rms_norm_eps", 1e-6))
    # HF builds q_a_layernorm / kv_a_layernorm with eps 1e-6 whatever rms_norm_eps says;
    # our MLA uses norm_eps for them, so only 1e-6 gives the same forward pass.
    if m.norm_eps != 1e-6:
        _fail("rms_norm_eps", m.norm_eps, (1e-6,))
    _require(hf, "hidden_act", ("silu",), "silu")
    m.activation = "swiglu"
    m.attn_bias = m.attn_out_bias = bool(hf.get("attention_bias", False))
    m.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
    m.rope_interleaved = bool(hf.get("rope_interleave", True))
    params = _rope_params(hf)
    m.rope_theta, m.rope_scaling = float(params["rope_theta"]), _rope_scaling(params, hf)
    m.mla = mla_defaults()
    m.mla.update(q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=int(hf["kv_lora_rank"]),
                 qk_nope_head_dim=int(hf["qk_nope_head_dim"]),
                 qk_rope_head_dim=int(hf["qk_rope_head_dim"]), v_head_dim=int(hf["v_head_dim"]))
    m.head_dim = m.mla.qk_nope_head_dim + m.mla.qk_rope_head_dim
    _require(hf, "scoring_func", ("sigmoid", "softmax"), "sigmoid")
    _require(hf, "topk_method", ("noaux_tc",), "noaux_tc")
    _require(hf, "moe_layer_freq", (1,), 1)
    experts = int(hf.get("n_routed_experts", hf.get("num_local_experts")))
    _moe_from(hf, m, num_experts=experts, top_k=int(hf["num_experts_per_tok"]),
              expert_mlp_dim=int(hf["moe_intermediate_size"]),
              num_shared_experts=int(hf.get("n_shared_experts") or 0),
              shared_mlp_dim=None,  # shared experts have the routed width in HF
              score_func=hf.get("scoring_func", "sigmoid"),
              norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
              routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
              n_group=int(hf.get("n_group") or 1), topk_group=int(hf.get("topk_group") or 1),
              first_k_dense=int(hf.get("first_k_dense_replace") or 0),
              bias_update_rate=1e-3)  # > 0 gives the layer its RouterBias (e_score_correction_bias)


def _gpt2(hf, m) -> None:
    act = hf.get("activation_function", "gelu_new")
    if act not in GPT2_ACTS:
        _fail("activation_function", act, tuple(GPT2_ACTS))
    _require(hf, "scale_attn_weights", (True,), True)
    _require(hf, "scale_attn_by_inverse_layer_idx", (False,), False)
    _require(hf, "reorder_and_upcast_attn", (False,), False)
    _require(hf, "add_cross_attention", (False,), False)
    d, h = int(hf["n_embd"]), int(hf["n_head"])
    m.update(vocab_size=int(hf["vocab_size"]), d_model=d, num_layers=int(hf["n_layer"]), num_heads=h,
             num_kv_heads=h, head_dim=d // h, mlp_dim=int(hf.get("n_inner") or 4 * d),
             max_seq_len=int(hf.get("n_positions", 1024)), activation=GPT2_ACTS[act],
             norm="layernorm", norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), norm_bias=True,
             attn_bias=True, attn_out_bias=True, mlp_bias=True, position_embedding="learned",
             tie_embeddings=bool(hf.get("tie_word_embeddings", True)))


def _json_float(v) -> float:
    """A float of config.json: a number, a string ("Infinity"), or transformers 5's
    {"__float__": "Infinity"} for the values JSON has no number for."""
    return float(v["__float__"] if isinstance(v, dict) else v)


def _mamba2(hf, m) -> None:
    """transformers' Mamba2Config (its defaults where a field is absent). Its gated norm
    spans all heads whatever n_groups is (our `ssm.norm_groups=1`; Mamba-2's own kernels
    normalise per group); the residual stream is kept in the model's dtype (HF:
    residual_in_fp32), the same in f32."""
    _require(hf, "hidden_act", ("silu",), "silu")
    _require(hf, "use_bias", (False,), False)
    _require(hf, "use_conv_bias", (True,), True)
    _require(hf, "rms_norm", (True,), True)
    limit = tuple(_json_float(v) for v in (hf.get("time_step_limit") or (0.0, math.inf)))
    if limit != (0.0, math.inf):
        _fail("time_step_limit", limit, "(0.0, inf): our Mamba-2 layer does not clamp dt")
    d, expand, head_dim = int(hf["hidden_size"]), int(hf.get("expand", 2)), int(hf.get("head_dim", 64))
    heads = int(hf.get("num_heads", expand * d // head_dim))
    if heads * head_dim != expand * d:
        _fail("num_heads", heads, f"expand * hidden_size / head_dim = {expand * d / head_dim:g}")
    m.update(vocab_size=int(hf["vocab_size"]), d_model=d, num_layers=int(hf["num_hidden_layers"]),
             norm="rmsnorm", norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), block_mlp=False,
             tie_embeddings=bool(hf.get("tie_word_embeddings", False)), layer_pattern=("mamba",),
             position_embedding="none", max_seq_len=int(hf.get("max_position_embeddings", 4096)))
    m.ssm = ssm_defaults()
    groups = int(hf.get("n_groups", 8))
    m.ssm.update(d_state=int(hf.get("state_size", 128)), d_conv=int(hf.get("conv_kernel", 4)),
                 expand=expand, head_dim=head_dim, n_groups=groups,
                 chunk_size=int(hf.get("chunk_size", 256)),
                 norm_groups=1 if groups > 1 else None)  # transformers' norm spans all heads


FAMILIES = {
    "llama": _llama, "mistral": _llama, "mixtral": _mixtral, "qwen25": _qwen2, "qwen3": _qwen3,
    "qwen3_moe": _qwen3_moe, "gemma3": _gemma3, "olmo2": _olmo2, "deepseek_v3": _deepseek_v3,
    "gpt2": _gpt2, "smollm3": _smollm3, "mamba2": _mamba2,
}


def text_config(hf: dict) -> dict:
    """The language-model part of a config: Gemma 3 multimodal nests it in `text_config`."""
    if hf.get("model_type") == "gemma3":
        if "text_config" not in hf:
            _fail("text_config", None, "a dict (model_type='gemma3' is multimodal)")
        return dict(hf["text_config"], model_type="gemma3_text")
    return hf


def from_hf(hf: dict, dtype: str = "float32") -> mlc.ConfigDict:
    """A full base config whose `model` is the HF config.json `hf` in our terms."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        _fail("model_type", model_type, tuple(MODEL_TYPES))
    hf = text_config(hf)
    c = get_base_config()
    m = c.model
    m.family = MODEL_TYPES[model_type]
    m.dtype = m.param_dtype = dtype
    m.attention_impl = "auto"
    m.init_std = float(hf.get("initializer_range", 0.02))
    FAMILIES[m.family](hf, m)
    return c


# ---------------------------------------------------------------------------- export


# Fields that do not change the forward pass, or that config.json does not carry.
_NOT_ARCHITECTURE = {"family", "dtype", "param_dtype", "attention_impl", "scan_layers", "remat",
                     "track_max_logits", "init_std", "dropout", "attention_dropout", "moe.aux_loss_coef", "moe.z_loss_coef",
                     "moe.bias_update_rate", "moe.dispatch", "moe.capacity_factor",
                     "moe.aux_loss_granularity", "ssm.impl"}
# Attention and MLP fields, which a model of Mamba-2 layers alone never reads.
_SSM_ONLY_UNUSED = {"num_heads", "num_kv_heads", "head_dim", "mlp_dim", "activation", "attn_bias",
                    "attn_out_bias", "mlp_bias", "rope_theta", "rope_scaling", "rope_fraction",
                    "rope_interleaved", "rope_local_theta", "rope_local_scaling", "qk_norm",
                    "qk_norm_per_head", "sliding_window", "logit_soft_cap", "query_pre_attn_scalar",
                    "attention_sinks", "chunk_size"}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k in ("moe", "mla", "ssm"):
            out.update(_flatten(v, f"{k}."))
        else:
            out[prefix + k] = v
    return out


def to_hf(m) -> dict:
    """Our model config -> an HF config.json dict; ValueError naming the first field that the
    family's config.json cannot express (checked by reading the result back with `from_hf`)."""
    out = _to_hf(m)
    back = _flatten(from_hf(out, m.param_dtype).model.to_dict())
    ours = _flatten(m.to_dict() if hasattr(m, "to_dict") else dict(m))
    unused = set()  # fields the model does not read in this configuration
    if m.mla is not None:
        unused |= {"head_dim", "num_kv_heads"}
    if out["model_type"] == "mamba2":
        unused |= _SSM_ONLY_UNUSED
    if m.moe is not None and m.moe.first_k_dense == 0 and m.moe.every == 1:
        unused |= {"mlp_dim", "moe.dense_mlp_dim"}
    for field in sorted(set(ours) | set(back)):
        if field in unused or field in _NOT_ARCHITECTURE or field.split(".")[0] in _NOT_ARCHITECTURE:
            continue
        a, b = ours.get(field), back.get(field)
        if a != b and not (isinstance(a, (list, tuple)) and tuple(a) == tuple(b or ())):
            raise ValueError(f"model.{field}={a!r} cannot be expressed in a {out['model_type']} "
                             f"config.json (it would load as {b!r})")
    return out


def _to_hf(m) -> dict:
    if m.family not in FAMILY_TO_TYPE:
        raise ValueError(f"model.family={m.family!r} has no Hugging Face export; "
                         f"allowed: {tuple(FAMILY_TO_TYPE)}")
    model_type = FAMILY_TO_TYPE[m.family]
    out = {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
           "torch_dtype": m.param_dtype, "vocab_size": m.vocab_size,
           "tie_word_embeddings": bool(m.tie_embeddings), "initializer_range": m.init_std,
           # Token ids belong to the tokenizer; family defaults may lie outside our vocab.
           "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
    if model_type == "gpt2":
        act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[m.activation]
        out.update(n_embd=m.d_model, n_layer=m.num_layers, n_head=m.num_heads, n_inner=m.mlp_dim,
                   n_positions=m.max_seq_len, activation_function=act, layer_norm_epsilon=m.norm_eps,
                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return out
    if model_type == "mamba2":
        s = m.ssm
        if s is None:
            raise ValueError("model.family='mamba2' needs model.ssm (configs/hybrid.py:arch=mamba2)")
        out.update(hidden_size=m.d_model, num_hidden_layers=m.num_layers, layer_norm_epsilon=m.norm_eps,
                   state_size=s.d_state, conv_kernel=s.d_conv, expand=s.expand, head_dim=s.head_dim,
                   num_heads=s.expand * m.d_model // s.head_dim, n_groups=s.n_groups,
                   chunk_size=s.chunk_size, use_bias=False, use_conv_bias=True, hidden_act="silu",
                   rms_norm=True, residual_in_fp32=True, max_position_embeddings=m.max_seq_len)
        return out
    out.update(hidden_size=m.d_model, num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
               num_key_value_heads=m.num_kv_heads,
               intermediate_size=(m.moe.dense_mlp_dim or m.mlp_dim) if m.moe is not None else m.mlp_dim,
               max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps,
               attention_bias=bool(m.attn_bias), attention_dropout=0.0)
    kinds = [m.layer_pattern[i % len(m.layer_pattern)] for i in range(m.num_layers)]
    rope = _rope_to_hf(m.rope_theta, m.rope_scaling)
    out.update(rope_theta=rope["rope_theta"], rope_parameters=rope)
    if m.rope_scaling:
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if model_type != "deepseek_v3":
        out.update(head_dim=m.head_dim, hidden_act="gelu_pytorch_tanh" if m.activation == "geglu" else "silu")
        out["layer_types"] = ["sliding_attention" if k == "local" else "full_attention" for k in kinds]
        if "local" in kinds:
            out["sliding_window"] = m.sliding_window
            out["use_sliding_window"] = True
            if model_type in ("qwen2", "qwen3", "qwen3_moe"):
                out["max_window_layers"] = kinds.index("local")
        else:
            out["sliding_window"] = None
            out["use_sliding_window"] = False
        if model_type == "mistral":
            del out["layer_types"]  # Mistral: one window for all layers
    if model_type == "llama":
        out["mlp_bias"] = bool(m.mlp_bias)
    if model_type == "smollm3":
        out["no_rope_layers"] = [int(k != "nope") for k in kinds]
        out["layer_types"] = ["full_attention"] * m.num_layers
    if m.moe is not None and model_type == "mixtral":
        out.update(num_local_experts=m.moe.num_experts, num_experts_per_tok=m.moe.top_k,
                   router_aux_loss_coef=m.moe.aux_loss_coef, intermediate_size=m.moe.expert_mlp_dim)
    if model_type == "qwen3_moe":
        out.update(num_experts=m.moe.num_experts, num_experts_per_tok=m.moe.top_k,
                   moe_intermediate_size=m.moe.expert_mlp_dim, norm_topk_prob=m.moe.norm_topk_prob,
                   decoder_sparse_step=m.moe.every, mlp_only_layers=list(range(m.moe.first_k_dense)),
                   router_aux_loss_coef=m.moe.aux_loss_coef)
    if model_type == "gemma3_text":
        local = _rope_to_hf(m.rope_local_theta or m.rope_theta,
                            m.rope_scaling if m.rope_local_scaling else None)
        out.update(query_pre_attn_scalar=m.query_pre_attn_scalar or m.head_dim,
                   attn_logit_softcapping=m.logit_soft_cap,
                   final_logit_softcapping=m.final_logit_soft_cap,
                   rope_local_base_freq=local["rope_theta"],
                   rope_parameters={"full_attention": rope, "sliding_attention": local})
    if model_type == "deepseek_v3":
        mla, moe = m.mla, m.moe
        out.update(hidden_act="silu", num_key_value_heads=m.num_heads, q_lora_rank=mla.q_lora_rank,
                   kv_lora_rank=mla.kv_lora_rank, qk_nope_head_dim=mla.qk_nope_head_dim,
                   qk_rope_head_dim=mla.qk_rope_head_dim, v_head_dim=mla.v_head_dim,
                   rope_interleave=bool(m.rope_interleaved), n_routed_experts=moe.num_experts,
                   num_experts_per_tok=moe.top_k, moe_intermediate_size=moe.expert_mlp_dim,
                   n_shared_experts=moe.num_shared_experts, scoring_func=moe.score_func,
                   norm_topk_prob=moe.norm_topk_prob, routed_scaling_factor=moe.routed_scaling_factor,
                   n_group=moe.n_group, topk_group=moe.topk_group,
                   first_k_dense_replace=moe.first_k_dense, topk_method="noaux_tc",
                   moe_layer_freq=1, num_nextn_predict_layers=0)
        if moe.num_shared_experts and (moe.shared_mlp_dim or moe.expert_mlp_dim) != moe.expert_mlp_dim:
            raise ValueError(f"model.moe.shared_mlp_dim={moe.shared_mlp_dim} must equal expert_mlp_dim="
                             f"{moe.expert_mlp_dim} for a DeepSeek-V3 export")
    if math.isinf(out.get("rope_theta", 0.0)):
        raise ValueError("model.rope_theta must be finite")
    return out
