"""Mixtral 8x7B (Jiang et al. 2024): Mistral 7B with 8 SwiGLU experts per layer, top-2 softmax routing.

    python train.py --config=configs/mixtral.py:tiny --workdir=runs/mixtral
"""
from configs.base import get_base_config, locked, moe_defaults, parse_arg, tiny_training


@locked
def get_config(arg: str = "tiny"):
    variant, _ = parse_arg(arg)
    c = get_base_config()
    m = c.model
    m.update(family="mixtral", activation="swiglu", norm_eps=1e-5, rope_theta=1e6)
    m.moe = moe_defaults()
    m.moe.update(num_experts=8, top_k=2, score_func="softmax", norm_topk_prob=True, aux_loss_coef=0.02)
    if variant == "tiny":
        tiny_training(c)
        m.update(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=256)
        m.moe.update(num_experts=4, expert_mlp_dim=128)
    elif variant == "small":
        m.update(vocab_size=32_000, d_model=1024, num_layers=8, num_heads=16, num_kv_heads=8,
                 head_dim=64, mlp_dim=3584, max_seq_len=4096, dtype="bfloat16")
        m.moe.expert_mlp_dim = 3584
    else:
        m.update(vocab_size=32_000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                 head_dim=128, mlp_dim=14_336, max_seq_len=32_768, dtype="bfloat16")
        m.moe.expert_mlp_dim = 14_336
    return c
