"""GPT-2 (Radford et al. 2019), 124M by default: learned positions, pre-LayerNorm with
biases, GELU (tanh), tied embeddings — the model nanoGPT reproduces.

    python train.py --config=configs/gpt2.py:tiny --workdir=runs/gpt2
    arg: tiny|small|full, size=124m|350m|774m|1.5b|1.3b (1.3b: 24 layers, d 2048, 16 heads)
"""
from configs.base import get_base_config, locked, parse_arg, tiny_training

SIZES = {"124m": (12, 768, 12), "350m": (24, 1024, 16), "774m": (36, 1280, 20),
         "1.5b": (48, 1600, 25), "1.3b": (24, 2048, 16)}


@locked
def get_config(arg: str = "tiny"):
    variant, opts = parse_arg(arg)
    c = get_base_config()
    m = c.model
    m.update(family="gpt2", activation="gelu_tanh", norm="layernorm", norm_eps=1e-5, norm_bias=True,
             attn_bias=True, attn_out_bias=True, mlp_bias=True, position_embedding="learned",
             tie_embeddings=True)
    if variant == "tiny":
        tiny_training(c)
        m.update(d_model=128, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=32, mlp_dim=512)
        return c
    size = opts.get("size", "124m" if variant == "full" else "1.3b")
    if size not in SIZES:
        raise ValueError(f"gpt2 size={size!r} must be one of {tuple(SIZES)}")
    layers, d, h = SIZES[size]
    m.update(vocab_size=50_257, d_model=d, num_layers=layers, num_heads=h, num_kv_heads=h,
             head_dim=d // h, mlp_dim=4 * d, max_seq_len=1024 if variant == "full" else 4096)
    if variant == "small":
        m.dtype = "bfloat16"
    return c
