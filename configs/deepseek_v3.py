"""DeepSeek-V3 (DeepSeek-AI 2024): MLA attention, 1 shared + 256 routed experts (top-8,
sigmoid scores, group-limited routing 8 groups / 4 kept, routed scale 2.5), first 3
layers dense, auxiliary-loss-free balancing by a per-expert bias, YaRN to 128k.
671B total / 37B active (without the multi-token-prediction module).

    python train.py --config=configs/deepseek_v3.py:tiny --workdir=runs/dsv3
"""
from configs.base import (
    get_base_config,
    locked,
    mla_defaults,
    moe_defaults,
    parse_arg,
    tiny_training,
)


@locked
def get_config(arg: str = "tiny"):
    variant, _ = parse_arg(arg)
    c = get_base_config()
    m = c.model
    m.update(family="deepseek_v3", activation="swiglu", norm_eps=1e-6, rope_theta=10_000.0,
             rope_interleaved=True)
    m.mla, m.moe = mla_defaults(), moe_defaults()
    m.moe.update(score_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
                 num_shared_experts=1, bias_update_rate=1e-3, aux_loss_coef=1e-4)
    if variant == "tiny":
        tiny_training(c)
        m.update(d_model=128, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=32, mlp_dim=256)
        m.mla.update(q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
        m.moe.update(num_experts=8, top_k=2, expert_mlp_dim=64, n_group=4, topk_group=2, first_k_dense=1)
    elif variant == "small":  # a one-GPU MoE for benchmarks
        m.update(vocab_size=129_280, d_model=1024, num_layers=12, num_heads=16, num_kv_heads=16,
                 head_dim=192, mlp_dim=4096, max_seq_len=4096, dtype="bfloat16")
        m.mla.update(q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
        m.moe.update(num_experts=64, top_k=6, expert_mlp_dim=512, n_group=8, topk_group=4, first_k_dense=1)
    else:
        m.update(vocab_size=129_280, d_model=7168, num_layers=61, num_heads=128, num_kv_heads=128,
                 head_dim=192, mlp_dim=18_432, max_seq_len=163_840, dtype="bfloat16",
                 rope_scaling=dict(type="yarn", factor=40.0, original_max_position_embeddings=4096,
                                   beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0))
        m.mla.update(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
        m.moe.update(num_experts=256, top_k=8, expert_mlp_dim=2048, n_group=8, topk_group=4, first_k_dense=3)
    return c
