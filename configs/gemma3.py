"""Gemma 3 (Gemma Team 2025), text model: 5 local (window 1024, RoPE 10k) : 1 global
(RoPE 1M, linear scaling 8) layers, QK-norm, sandwich norms with (1+w) RMSNorm, GeGLU,
embeddings scaled by sqrt(d) and tied to the output head.

    python train.py --config=configs/gemma3.py:tiny --workdir=runs/gemma3
"""
from configs.base import get_base_config, locked, parse_arg, tiny_training


@locked
def get_config(arg: str = "tiny"):
    variant, _ = parse_arg(arg)
    c = get_base_config()
    m = c.model
    m.update(family="gemma3", activation="geglu", norm_eps=1e-6, rmsnorm_unit_offset=True,
             norm_placement="sandwich", qk_norm=True, qk_norm_per_head=True, embed_scale=True,
             tie_embeddings=True, layer_pattern=("local",) * 5 + ("global",),
             rope_theta=1e6, rope_local_theta=10_000.0)
    if variant == "tiny":
        tiny_training(c)
        m.update(d_model=128, num_layers=6, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=384,
                 sliding_window=32, query_pre_attn_scalar=32)
    elif variant == "small":  # Gemma 3 1B-like
        m.update(vocab_size=262_144, d_model=1152, num_layers=26, num_heads=4, num_kv_heads=1,
                 head_dim=256, mlp_dim=6912, max_seq_len=32_768, sliding_window=512,
                 query_pre_attn_scalar=256, dtype="bfloat16")
    else:  # Gemma 3 27B
        m.update(vocab_size=262_208, d_model=5376, num_layers=62, num_heads=32, num_kv_heads=16,
                 head_dim=128, mlp_dim=21_504, max_seq_len=131_072, sliding_window=1024,
                 query_pre_attn_scalar=168, dtype="bfloat16",
                 rope_scaling=dict(type="linear", factor=8.0))
    return c
