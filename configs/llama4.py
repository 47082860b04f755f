"""Llama 4 Scout and Maverick (Meta 2025): MoE with one shared expert and top-1 sigmoid
routing; three of every four layers use chunked attention (8192-token chunks) with RoPE,
the fourth is a global NoPE layer. Scout: 16 experts in every layer (109B / 17B active);
Maverick: 128 experts in every second layer (400B / 17B active).

    python train.py --config=configs/llama4.py:tiny --workdir=runs/llama4
    arg: tiny|small|full, size=scout|maverick (default scout)

Not modelled: the weight-free L2 QK-norm of the RoPE layers (a learned RMSNorm would add
weights) and the attention temperature tuning of NoPE layers at long context.
"""
from configs.base import get_base_config, locked, moe_defaults, parse_arg, tiny_training


@locked
def get_config(arg: str = "tiny"):
    variant, opts = parse_arg(arg)
    size = opts.get("size", "scout")
    if size not in ("scout", "maverick"):
        raise ValueError(f"llama4 size={size!r} must be one of ('scout', 'maverick')")
    c = get_base_config()
    m = c.model
    m.update(family="llama4", activation="swiglu", norm_eps=1e-5, rope_theta=500_000.0,
             rope_interleaved=True, layer_pattern=("chunked", "chunked", "chunked", "nope"))
    m.moe = moe_defaults()
    m.moe.update(score_func="sigmoid", norm_topk_prob=False, top_k=1, num_shared_experts=1,
                 every=2 if size == "maverick" else 1)
    if variant == "tiny":
        tiny_training(c)
        m.update(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=256,
                 chunk_size=32)
        m.moe.update(num_experts=4, expert_mlp_dim=128, dense_mlp_dim=256)
    elif variant == "small":
        m.update(vocab_size=202_048, d_model=1024, num_layers=8, num_heads=8, num_kv_heads=2,
                 head_dim=128, mlp_dim=4096, max_seq_len=8192, chunk_size=2048, dtype="bfloat16")
        m.moe.update(num_experts=16, expert_mlp_dim=2048, dense_mlp_dim=4096)
    else:
        m.update(vocab_size=202_048, d_model=5120, num_layers=48, num_heads=40, num_kv_heads=8,
                 head_dim=128, mlp_dim=16_384, max_seq_len=262_144 if size == "maverick" else 10_485_760,
                 chunk_size=8192, dtype="bfloat16",
                 rope_scaling=None if size == "maverick" else dict(
                     type="llama3", factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                     original_max_position_embeddings=8192))
        m.moe.update(num_experts=128 if size == "maverick" else 16, expert_mlp_dim=8192,
                     dense_mlp_dim=16_384)
    return c
