"""Kimi K2 (Moonshot AI 2025): the DeepSeek-V3 architecture with 64 heads, 384 experts
(top-8 + 1 shared), one dense layer, no expert groups; trained with MuonClip.
About 1.04T total / 32B active parameters.

    python train.py --config=configs/kimi_k2.py:tiny --workdir=runs/k2
"""
from configs import deepseek_v3
from configs.base import locked, parse_arg


@locked
def get_config(arg: str = "tiny"):
    variant, _ = parse_arg(arg)
    c = deepseek_v3.get_config(arg)
    m = c.model
    m.family = "kimi_k2"
    m.moe.update(routed_scaling_factor=2.827, n_group=1, topk_group=1, first_k_dense=1)
    c.optim.update(name="muon", qk_clip_tau=100.0)  # MuonClip
    m.track_max_logits = True  # QK-Clip reads the per-head max attention logits
    if variant == "tiny":
        m.moe.num_experts = 12
    elif variant == "full":
        m.update(vocab_size=163_840, num_heads=64, num_kv_heads=64, rope_theta=50_000.0, max_seq_len=131_072,
                 rope_scaling=dict(type="yarn", factor=32.0, original_max_position_embeddings=4096,
                                   beta_fast=1.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0))
        m.moe.num_experts = 384
    return c
