"""Llama 3 / 3.1 (Meta 2024, "The Llama 3 Herd of Models"): GQA, SwiGLU, RMSNorm, RoPE θ=500k.

    python train.py --config=configs/llama3.py:tiny --workdir=runs/tiny
    python train.py --config=configs/llama3.py:full,size=70b ...

arg: tiny | small | full, optionally ",size=8b|70b|405b" for full (default 8b).
"""
from __future__ import annotations

from configs.base import get_base_config, locked, parse_arg

SIZES = {  # layers, d_model, heads, kv_heads, mlp_dim (Table 3 of the paper)
    "8b": (32, 4096, 32, 8, 14336),
    "70b": (80, 8192, 64, 8, 28672),
    "405b": (126, 16384, 128, 8, 53248),
}


@locked
def get_config(arg: str = "tiny"):
    variant, opts = parse_arg(arg)
    c = get_base_config()
    m = c.model
    m.family = "llama"
    m.activation = "swiglu"
    m.norm = "rmsnorm"
    m.norm_eps = 1e-5
    m.rope_theta = 500_000.0
    if variant == "tiny":  # runs on a laptop CPU in seconds
        m.update(vocab_size=256, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2,
                 head_dim=32, mlp_dim=384, max_seq_len=256)
        c.data.seq_len, c.data.batch_size = 128, 16
        c.train.steps = 300
    elif variant == "small":  # ~1B: a one-GPU model for benchmarks (16 layers, d 2048)
        m.update(vocab_size=32_000, d_model=2048, num_layers=16, num_heads=16, num_kv_heads=8,
                 head_dim=128, mlp_dim=5632, max_seq_len=4096, dtype="bfloat16")
        c.data.seq_len, c.data.batch_size = 4096, 8
    else:
        size = opts.get("size", "8b")
        if size not in SIZES:
            raise ValueError(f"llama3 size={size!r} must be one of {tuple(SIZES)}")
        layers, d, h, kv, f = SIZES[size]
        m.update(vocab_size=128_256, d_model=d, num_layers=layers, num_heads=h, num_kv_heads=kv,
                 head_dim=128, mlp_dim=f, max_seq_len=131_072, dtype="bfloat16")
        # Llama 3.1 context extension from 8k to 128k.
        m.rope_scaling = dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=8192)
    return c
