"""OLMo 2 (OLMo et al. 2024): norms on the branch outputs inside the residual (no input
norm), QK-norm over all heads jointly, MHA, SwiGLU.

    python train.py --config=configs/olmo2.py:tiny --workdir=runs/olmo2
"""
from configs.base import get_base_config, locked, parse_arg, tiny_training


@locked
def get_config(arg: str = "tiny"):
    variant, _ = parse_arg(arg)
    c = get_base_config()
    m = c.model
    m.update(family="olmo2", activation="swiglu", norm_eps=1e-6, norm_placement="olmo2",
             qk_norm=True, qk_norm_per_head=False, rope_theta=500_000.0)
    if variant == "tiny":
        tiny_training(c)
        m.update(d_model=128, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=32, mlp_dim=384)
    elif variant == "small":
        m.update(vocab_size=100_352, d_model=2048, num_layers=16, num_heads=16, num_kv_heads=16,
                 head_dim=128, mlp_dim=8192, max_seq_len=4096, dtype="bfloat16")
    else:  # OLMo 2 7B
        m.update(vocab_size=100_352, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                 head_dim=128, mlp_dim=11_008, max_seq_len=4096, dtype="bfloat16")
    return c
