"""A T5-style encoder-decoder (Raffel et al. 2020), base size: pre-RMSNorm, ReLU MLP, no
biases, shared embeddings, cross-attention in every decoder layer. Positions use RoPE
here instead of T5's bucketed relative bias.

    model(decoder_tokens, encoder_tokens=source_tokens)
"""
from configs.base import get_base_config, locked, parse_arg, tiny_training


@locked
def get_config(arg: str = "tiny"):
    variant, _ = parse_arg(arg)
    c = get_base_config()
    m = c.model
    m.update(family="t5", kind="encoder_decoder", activation="relu", norm_eps=1e-6,
             tie_embeddings=True)
    if variant == "tiny":
        tiny_training(c)
        m.update(d_model=128, num_layers=2, num_encoder_layers=2, num_heads=4, num_kv_heads=4,
                 head_dim=32, mlp_dim=512)
    else:  # T5-base
        m.update(vocab_size=32_128, d_model=768, num_layers=12, num_encoder_layers=12, num_heads=12,
                 num_kv_heads=12, head_dim=64, mlp_dim=3072, max_seq_len=512)
    return c
