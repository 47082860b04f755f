"""A BERT-style encoder (Devlin et al. 2019), base size: bidirectional attention,
post-LayerNorm, learned positions, GELU, biases. (No token-type embeddings or pooler.)

    model(tokens)   # [B, T, vocab] from bidirectional attention

train.py trains next-token prediction, so it refuses this config (kind='encoder'); there
is no masked-LM objective yet.
"""
from configs.base import get_base_config, locked, parse_arg, tiny_training


@locked
def get_config(arg: str = "tiny"):
    variant, _ = parse_arg(arg)
    c = get_base_config()
    m = c.model
    m.update(family="bert", kind="encoder", causal=False, activation="gelu", norm="layernorm",
             norm_eps=1e-12, norm_placement="post", attn_bias=True, attn_out_bias=True, mlp_bias=True,
             position_embedding="learned", tie_embeddings=True, final_norm=False)
    if variant == "tiny":
        tiny_training(c)
        m.update(d_model=128, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=32, mlp_dim=512)
    else:  # BERT-base (small and full alike)
        m.update(vocab_size=30_522, d_model=768, num_layers=12, num_heads=12, num_kv_heads=12,
                 head_dim=64, mlp_dim=3072, max_seq_len=512)
    return c
