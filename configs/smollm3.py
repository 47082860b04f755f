"""SmolLM 3 (Hugging Face 2025), 3B: Llama-style GQA 16:4 with every 4th layer NoPE
(no rotary embedding), tied embeddings.

    python train.py --config=configs/smollm3.py:tiny --workdir=runs/smollm3
"""
from configs.base import get_base_config, locked, parse_arg, tiny_training


@locked
def get_config(arg: str = "tiny"):
    variant, _ = parse_arg(arg)
    c = get_base_config()
    m = c.model
    m.update(family="smollm3", activation="swiglu", norm_eps=1e-6, tie_embeddings=True,
             rope_theta=5e6, layer_pattern=("global", "global", "global", "nope"))
    if variant == "tiny":
        tiny_training(c)
        m.update(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=384)
    elif variant == "small":
        m.update(vocab_size=128_256, d_model=1536, num_layers=16, num_heads=12, num_kv_heads=4,
                 head_dim=128, mlp_dim=6144, max_seq_len=4096, dtype="bfloat16")
    else:
        m.update(vocab_size=128_256, d_model=2048, num_layers=36, num_heads=16, num_kv_heads=4,
                 head_dim=128, mlp_dim=11_008, max_seq_len=65_536, dtype="bfloat16")
    return c
