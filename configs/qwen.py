"""Qwen 2.5 (dense, QKV bias) and Qwen 3 (dense and MoE, per-head QK-norm).

    python train.py --config=configs/qwen.py:tiny,version=3 --workdir=runs/qwen3
    arg: tiny|small|full, version=2.5|3 (default 3), moe (Qwen3-30B-A3B), size=32b (Qwen 2.5/3 32B, default)

Qwen 2.5 32B: 64 layers, d 5120, GQA 40:8, SwiGLU 27648, bias on q/k/v.
Qwen 3 32B: 64 layers, d 5120, GQA 64:8, SwiGLU 25600, QK-norm, no bias.
Qwen3-30B-A3B: 48 layers, d 2048, GQA 32:4, 128 experts top-8 of width 768.
"""
from configs.base import get_base_config, locked, moe_defaults, parse_arg, tiny_training


@locked
def get_config(arg: str = "tiny"):
    variant, opts = parse_arg(arg)
    version = str(opts.get("version", "3"))
    if version not in ("2.5", "3"):
        raise ValueError(f"qwen version={version!r} must be one of ('2.5', '3')")
    moe = bool(opts.get("moe", False))
    if moe and version != "3":
        raise ValueError("qwen moe is a Qwen 3 model: use version=3")
    c = get_base_config()
    m = c.model
    m.update(family=f"qwen{version.replace('.', '')}{'_moe' if moe else ''}", activation="swiglu",
             norm_eps=1e-6, rope_theta=1e6)
    if version == "2.5":
        m.attn_bias = True
    else:
        m.update(qk_norm=True, qk_norm_per_head=True)
    if moe:
        m.moe = moe_defaults()
        m.moe.update(score_func="softmax", norm_topk_prob=True, aux_loss_coef=0.001)
    if variant == "tiny":
        tiny_training(c)
        m.update(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=384)
        if moe:
            m.moe.update(num_experts=8, top_k=2, expert_mlp_dim=64)
    elif variant == "small":
        m.update(vocab_size=151_936, d_model=2048, num_layers=16, num_heads=16, num_kv_heads=8,
                 head_dim=128, mlp_dim=6144, max_seq_len=4096, dtype="bfloat16")
        if moe:
            m.moe.update(num_experts=32, top_k=4, expert_mlp_dim=768)
    elif moe:  # Qwen3-30B-A3B
        m.update(vocab_size=151_936, d_model=2048, num_layers=48, num_heads=32, num_kv_heads=4,
                 head_dim=128, mlp_dim=6144, max_seq_len=40_960, dtype="bfloat16")
        m.moe.update(num_experts=128, top_k=8, expert_mlp_dim=768)
    elif version == "2.5":  # Qwen2.5-32B
        m.update(vocab_size=152_064, d_model=5120, num_layers=64, num_heads=40, num_kv_heads=8,
                 head_dim=128, mlp_dim=27_648, max_seq_len=32_768, dtype="bfloat16")
    else:  # Qwen3-32B
        m.update(vocab_size=151_936, d_model=5120, num_layers=64, num_heads=64, num_kv_heads=8,
                 head_dim=128, mlp_dim=25_600, max_seq_len=40_960, dtype="bfloat16")
    return c
