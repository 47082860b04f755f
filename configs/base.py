"""Defaults shared by every family: the model schema and the training setup.

A family file (configs/llama3.py, ...) starts from `get_base_config()` and lists only
what differs. Every field has one default and one comment here.

    cfg = configs.base.get_base_config()
    cfg.model.num_layers = 4
"""
from __future__ import annotations

import functools

import ml_collections as mlc

VARIANTS = ("tiny", "small", "full")


# Typed placeholders: a field whose default is None still has a type, so that
# `--config.model.sliding_window=4096` parses on the command line.
def _int():
    return mlc.config_dict.placeholder(int)


def _float():
    return mlc.config_dict.placeholder(float)


def _str():
    return mlc.config_dict.placeholder(str)


def locked(get_config):
    """Decorator of a family's `get_config`: the returned config is locked, so a mistyped
    key (`--config.optim.lrr=...`, or `cfg.optim.lrr = ...` in Python) is an error that
    names the nearest field instead of a new field that nothing reads. Existing fields
    stay settable; `with cfg.unlocked():` adds new ones on purpose."""
    @functools.wraps(get_config)
    def wrapper(*args, **kwargs):
        c = get_config(*args, **kwargs)
        c.lock()
        return c
    return wrapper


def parse_arg(arg: str | None) -> tuple[str, dict]:
    """'full,size=70b' -> ('full', {'size': '70b'}); a bare flag 'x' becomes {'x': True}."""
    variant, *rest = (arg or "tiny").split(",")
    opts = {}
    for item in rest:
        key, _, value = item.partition("=")
        opts[key] = value if value else True
    if variant not in VARIANTS:
        raise ValueError(f"config variant {variant!r} must be one of {VARIANTS}")
    return variant, opts


def tiny_training(c: mlc.ConfigDict) -> mlc.ConfigDict:
    """Training settings of every `tiny` variant: byte-level stdlib corpus on a laptop CPU."""
    c.model.vocab_size = 256
    c.model.max_seq_len = 256
    c.model.dtype = "float32"
    c.data.seq_len, c.data.batch_size = 128, 16
    return c


def model_defaults() -> mlc.ConfigDict:
    m = mlc.ConfigDict()
    m.family = "llama"               # free-form name of the family (for HF export, logs)
    m.kind = "decoder"               # decoder | encoder | encoder_decoder
    m.vocab_size = 256               # byte-level by default
    m.d_model = 64                   # residual stream width ("embed")
    m.num_layers = 2                 # decoder layers (encoder layers for kind=encoder)
    m.num_encoder_layers = 0         # encoder layers of an encoder_decoder model
    m.num_heads = 4                  # query heads
    m.num_kv_heads = 2               # key/value heads (GQA: divides num_heads; 1 = MQA)
    m.head_dim = 16                  # per-head width of q/k (and v unless MLA)
    m.mlp_dim = 128                  # hidden width of the dense MLP
    m.max_seq_len = 256              # longest sequence the model accepts
    m.dtype = "float32"              # compute dtype (bf16 on accelerators)
    m.param_dtype = "float32"        # parameters are kept in f32
    # Projections' matmuls (arch/precision.py): bf16 (= in model.dtype) | fp8_tensorwise |
    # fp8_rowwise | fp8_blockwise (MoE experts: up to rowwise); embeddings, head and router
    # stay in model.dtype.
    m.matmul_precision = "bf16"
    # Norms.
    m.norm = "rmsnorm"               # rmsnorm | layernorm
    m.norm_eps = 1e-6
    m.norm_bias = True               # layernorm only: learn a bias
    m.rmsnorm_unit_offset = False    # Gemma: scale by (1 + w), w initialised at 0
    m.norm_placement = "pre"         # pre | post | sandwich (Gemma) | olmo2 (norm on branch output)
    # MLP.
    m.activation = "swiglu"          # swiglu | geglu | gelu | gelu_tanh | relu | relu2 | silu
    m.mlp_bias = False
    # Attention.
    m.attention_impl = "auto"        # see pallas_kernels.flash_attention.api.IMPLS
    m.causal = True                  # False for encoders
    m.attn_bias = False              # bias on q/k/v projections (Qwen 2)
    m.attn_out_bias = False          # bias on the output projection (GPT-2)
    m.qk_norm = False                # RMSNorm on per-head q and k (OLMo 2, Qwen 3, Gemma 3)
    m.qk_norm_per_head = True        # False: OLMo 2 style norm over all heads jointly
    m.logit_soft_cap = _float()      # Gemma 2 attention logit soft-cap
    m.final_logit_soft_cap = _float()  # Gemma 2 output logit soft-cap
    m.attention_sinks = False        # learned per-head sink logit in the softmax denominator
    m.query_pre_attn_scalar = _float()  # softmax scale 1/sqrt(this) instead of 1/sqrt(head_dim)
    m.sliding_window = _int()        # window for "local" layers (tokens seen incl. self)
    m.chunk_size = _int()            # window for "chunked" layers (Llama 4 chunked attention)
    # Per-layer attention kinds, repeated to num_layers: "global", "local" (sliding
    # window), "nope" (global, no RoPE: SmolLM 3, Llama 4), "chunked". Gemma 3: 5 local : 1 global.
    # Hybrids: "mamba" (a Mamba-2 mixer, model.ssm), "mlp" (no mixer; see model.block_mlp).
    m.layer_pattern = ("global",)
    # Positions.
    m.position_embedding = "rope"    # rope | learned | sinusoidal | none
    m.rope_theta = 10000.0
    m.rope_local_theta = _float()    # Gemma 3: local layers use a different base (10k)
    m.rope_fraction = 1.0            # partial rotary: rotate this fraction of head_dim
    m.rope_interleaved = False       # False: rotate-half (Llama/HF); True: GPT-J pairs
    m.rope_scaling = None            # None or dict(type=linear|ntk|dynamic_ntk|yarn|llama3, ...)
    m.rope_local_scaling = False     # apply rope_scaling on local layers too
    # Embeddings and head.
    m.tie_embeddings = False
    m.embed_scale = False            # Gemma: multiply embeddings by sqrt(d_model)
    m.final_norm = True
    # MLA (DeepSeek-V2/V3, Kimi K2): None or a dict, see arch/mla.py.
    m.mla = None
    # MoE: None or a dict, see arch/moe.py.
    m.moe = None
    # Mamba-2 mixers for layers of kind "mamba" in layer_pattern: None or a dict, see
    # arch/ssm.py and ssm_defaults() below.
    m.ssm = None
    m.block_mlp = True               # False: a layer is one sub-layer (Mamba-2, Nemotron-H): its
                                     # mixer alone; layers of kind "mlp" are a feed-forward alone
    # Execution.
    m.scan_layers = False            # nnx.scan over identical layers instead of a list
    m.remat = "none"                 # none | full | dots_saveable
    m.track_max_logits = False       # report per-head max attention logits (QK-Clip)
    m.init_std = 0.02
    # Dropout (arch/dropout.py), only in the training step: on the embeddings and on each
    # residual branch's output (GPT-2's embd/resid_pdrop); attention_dropout on the
    # softmax probabilities, inside the kernel (None: the same as dropout).
    m.dropout = 0.0
    m.attention_dropout = _float()
    return m


def mla_defaults() -> mlc.ConfigDict:
    return mlc.ConfigDict(dict(
        q_lora_rank=_int(),          # None: full-rank query projection (DeepSeek-V2-Lite)
        kv_lora_rank=32,             # compressed KV width (the cached latent)
        qk_nope_head_dim=16,         # per-head q/k width without RoPE
        qk_rope_head_dim=8,          # decoupled RoPE width; the key part is shared by heads
        v_head_dim=16,               # per-head value width
        absorb=False,                # True: absorbed attention in training too (arch/mla.py)
    ))


def moe_defaults() -> mlc.ConfigDict:
    return mlc.ConfigDict(dict(
        num_experts=8,               # routed experts
        top_k=2,                     # experts per token
        expert_mlp_dim=64,           # hidden width of each routed expert
        num_shared_experts=0,        # always-on experts (DeepSeek), width shared_mlp_dim each
        shared_mlp_dim=_int(),       # None: expert_mlp_dim
        score_func="softmax",        # softmax | sigmoid (DeepSeek-V3)
        norm_topk_prob=True,         # renormalise the top-k weights to sum to 1
        routed_scaling_factor=1.0,   # multiply routed output (DeepSeek-V3: 2.5)
        n_group=1,                   # group-limited routing: expert groups
        topk_group=1,                # groups kept per token
        aux_loss_coef=0.0,           # alpha of alpha * E * sum_i f_i P_i
        aux_loss_granularity="batch",  # batch | sequence (DeepSeek-V3's sequence-wise loss)
        z_loss_coef=0.0,             # router z-loss coefficient
        bias_update_rate=0.0,        # aux-loss-free balancing rate u (0 = off)
        capacity_factor=_float(),    # None: dropless; float: token dropping at capacity
        dispatch="dropless",         # dropless (sort + grouped matmul) | capacity | dense (reference)
        gmm_impl="auto",             # dropless experts: auto | pallas_gpu | pallas_tpu | ragged_dot | reference
        first_k_dense=0,             # first k layers use a dense MLP (DeepSeek-V3: 3)
        every=1,                     # MoE every n-th layer, others dense (Llama 4 Maverick: 2)
        dense_mlp_dim=_int(),        # hidden width of the dense layers (None: model.mlp_dim)
    ))


def ssm_defaults() -> mlc.ConfigDict:
    return mlc.ConfigDict(dict(
        d_state=16,                  # N: state size per channel (Mamba-2: 128)
        d_conv=4,                    # width of the causal depthwise conv over x, B, C
        expand=2,                    # inner width = expand * d_model
        head_dim=16,                 # P: channels per SSM head; heads = expand * d_model / head_dim
        n_groups=1,                  # groups of heads sharing B and C (as kv heads in GQA)
        norm_groups=None,            # groups of the gated RMSNorm: None = n_groups (Mamba-2's
                                     # kernels), 1 = one norm over all heads (transformers' Mamba2)
        chunk_size=64,               # tokens per chunk of the chunked SSD (Mamba-2: 256)
        impl="auto",                 # auto | reference | chunked | pallas_gpu | pallas_tpu (pallas_kernels/ssd)
    ))


def get_base_config() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.model = model_defaults()
    c.seed = 0
    # Data.
    c.data = mlc.ConfigDict(dict(
        source="stdlib",             # stdlib (embedded corpus) | path to a file, dir, glob or .bin
        val_source=_str(),           # separate validation source; None: split off the source
        val_fraction=0.05,           # share of documents for validation when split
        tokenizer="byte",            # byte | path to a tokenizer.json
        seq_len=128,
        batch_size=8,
    ))
    # Optimizer (see optim/).
    c.optim = mlc.ConfigDict(dict(
        name="adamw",                # adamw | muon | moonlight
        lr=3e-3,
        schedule="cosine",           # constant | cosine | wsd
        warmup_steps=20,
        decay_fraction=0.2,          # wsd: share of steps spent decaying
        min_lr_ratio=0.1,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        grad_clip=1.0,
        muon_momentum=0.95,
        muon_nesterov=True,
        muon_lr=_float(),            # Muon's own peak lr (None: optim.lr); same schedule
        muon_ns_steps=5,             # Newton-Schulz iterations of the orthogonalisation
        muon_per_head=False,         # orthogonalise q/k/v/o per head, not per whole matrix
        moonlight_rms=0.2,           # moonlight: update RMS matched to AdamW's (Liu et al. 2025)
        # MuonClip threshold (Kimi K2: 100); None = off. A typed None, so that
        # --config.optim.qk_clip_tau=100 works on the command line.
        qk_clip_tau=_float(),
    ))
    # Training.
    c.train = mlc.ConfigDict(dict(
        steps=200,
        grad_accum=1,
        z_loss=1e-4,
        eval_every=100,
        eval_batches=8,
        log_every=10,
        checkpoint_every=100,
        keep_checkpoints=3,
        sample_tokens=64,
        sample_prompt="def ",
        sample_temperature=0.8,      # 0: greedy; else softmax(logits / temperature)
        # Start from the weights of another train.py workdir's newest checkpoint (a new
        # run: step 0, fresh optimizer and data); its model fields must match.
        init_from=_str(),
        # Several processes: every this many steps (and at log/checkpoint steps) they agree
        # whether one of them got a stop signal, so that all save the same step and exit.
        stop_check_every=10,
    ))
    c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1, sequence=1))
    return c
