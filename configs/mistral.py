"""Mistral 7B v0.1 (Jiang et al. 2023): Llama-style with GQA 32:8 and a 4096-token sliding window.

    python train.py --config=configs/mistral.py:tiny --workdir=runs/mistral
"""
from configs.base import get_base_config, locked, parse_arg, tiny_training


@locked
def get_config(arg: str = "tiny"):
    variant, _ = parse_arg(arg)
    c = get_base_config()
    m = c.model
    m.update(family="mistral", activation="swiglu", norm_eps=1e-5, rope_theta=10_000.0,
             layer_pattern=("local",))
    if variant == "tiny":
        tiny_training(c)
        m.update(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=384,
                 sliding_window=64)
    elif variant == "small":
        m.update(vocab_size=32_000, d_model=2048, num_layers=16, num_heads=16, num_kv_heads=4,
                 head_dim=128, mlp_dim=7168, max_seq_len=8192, sliding_window=4096, dtype="bfloat16")
    else:
        m.update(vocab_size=32_000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                 head_dim=128, mlp_dim=14_336, max_seq_len=32_768, sliding_window=4096, dtype="bfloat16")
    return c
