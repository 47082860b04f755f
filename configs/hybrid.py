"""Attention/SSM hybrids with Mamba-2 mixers (arch/ssm.py), and pure Mamba-2.

  arch=jamba       Jamba (Lieber et al. 2024, arXiv:2403.19887): blocks of mixer + MLP,
                   one attention layer (no RoPE) per 8, at offset 4; MoE (16 experts,
                   top-2) in every second layer. Jamba's mixers are Mamba-1; here they
                   are Mamba-2 (a Mamba-1 layer of Jamba's size has 3% more weights).
  arch=nemotron_h  Nemotron-H (NVIDIA 2025, arXiv:2504.03624): every layer one sub-layer
                   (model.block_mlp=False) from the pattern "M-M-M-M*-...": Mamba-2 (M),
                   squared-ReLU MLP (-), attention without positions (*); 8B: 24 + 24 + 4.
  arch=mamba2      Mamba-2 (Dao & Gu 2024, arXiv:2405.21060): Mamba-2 mixers only, tied
                   embeddings; full = 2.7B, small = 780M.

    python train.py --config=configs/hybrid.py:tiny --workdir=runs/hybrid
    python train.py --config=configs/hybrid.py:tiny,arch=nemotron_h --workdir=runs/nemotron
    python train.py --config=configs/hybrid.py:full,arch=nemotron_h ...

arg: tiny | small | full, with ",arch=jamba|nemotron_h|mamba2" (default jamba).
"""
from __future__ import annotations

from configs.base import (
    get_base_config,
    locked,
    moe_defaults,
    parse_arg,
    ssm_defaults,
    tiny_training,
)

ARCHS = ("jamba", "nemotron_h", "mamba2")
# Nemotron-H's hybrid_override_pattern letters -> our layer kinds.
NEMOTRON_KINDS = {"M": "mamba", "-": "mlp", "*": "nope"}
NEMOTRON_8B = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"  # 52 layers
JAMBA_PERIOD = ("mamba",) * 4 + ("nope",) + ("mamba",) * 3             # attention at offset 4 of 8


def nemotron_pattern(letters: str) -> tuple[str, ...]:
    """'M-*' -> ('mamba', 'mlp', 'nope')."""
    return tuple(NEMOTRON_KINDS[c] for c in letters)


@locked
def get_config(arg: str = "tiny"):
    variant, opts = parse_arg(arg)
    arch = opts.get("arch", "jamba")
    if arch not in ARCHS:
        raise ValueError(f"hybrid arch={arch!r} must be one of {ARCHS}")
    c = get_base_config()
    m = c.model
    m.family = arch
    m.ssm = ssm_defaults()
    if arch == "jamba":
        _jamba(c, variant)
    elif arch == "nemotron_h":
        _nemotron_h(c, variant)
    else:
        _mamba2(c, variant)
    return c


def _jamba(c, variant):
    m = c.model
    m.update(activation="swiglu", norm_eps=1e-6, layer_pattern=JAMBA_PERIOD)
    m.moe = moe_defaults()
    # Softmax top-2 without renormalisation, MoE at odd layers (expert_layer_offset 1, period 2).
    m.moe.update(top_k=2, score_func="softmax", norm_topk_prob=False, every=2, aux_loss_coef=0.001)
    if variant == "tiny":
        tiny_training(c)
        m.update(d_model=128, num_layers=8, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=256)
        m.moe.update(num_experts=4, expert_mlp_dim=128)
        m.ssm.update(d_state=16, head_dim=32, chunk_size=32)
    elif variant == "small":
        m.update(vocab_size=32_000, d_model=1024, num_layers=16, num_heads=16, num_kv_heads=8,
                 head_dim=64, mlp_dim=4096, max_seq_len=8192, dtype="bfloat16")
        m.moe.update(num_experts=8, expert_mlp_dim=4096)
        m.ssm.update(d_state=128, head_dim=64, chunk_size=256)
        c.data.seq_len, c.data.batch_size = 4096, 8
    else:  # Jamba v0.1: 52B total, 12B active
        m.update(vocab_size=65_536, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                 head_dim=128, mlp_dim=14_336, max_seq_len=262_144, dtype="bfloat16")
        m.moe.update(num_experts=16, expert_mlp_dim=14_336)
        m.ssm.update(d_state=128, head_dim=64, chunk_size=256)


def _nemotron_h(c, variant):
    m = c.model
    m.update(activation="relu2", norm_eps=1e-5, block_mlp=False)
    if variant == "tiny":
        tiny_training(c)
        m.update(d_model=128, num_layers=6, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=384,
                 layer_pattern=nemotron_pattern("M-M-*-"))
        m.ssm.update(d_state=16, head_dim=32, n_groups=2, chunk_size=32)
    elif variant == "small":  # ~1B, the 8B's proportions: 16 M, 16 -, 4 *
        m.update(vocab_size=131_072, d_model=1536, num_layers=36, num_heads=12, num_kv_heads=4,
                 head_dim=128, mlp_dim=6144, max_seq_len=8192, dtype="bfloat16",
                 layer_pattern=nemotron_pattern("M-M-M-M*-"))
        m.ssm.update(d_state=128, head_dim=64, n_groups=8, chunk_size=256)
        c.data.seq_len, c.data.batch_size = 4096, 8
    else:  # Nemotron-H-8B-Base
        m.update(vocab_size=131_072, d_model=4096, num_layers=52, num_heads=32, num_kv_heads=8,
                 head_dim=128, mlp_dim=21_504, max_seq_len=8192, dtype="bfloat16",
                 layer_pattern=nemotron_pattern(NEMOTRON_8B))
        m.ssm.update(d_state=128, head_dim=64, n_groups=8, chunk_size=256)


def _mamba2(c, variant):
    m = c.model
    m.update(norm_eps=1e-5, block_mlp=False, tie_embeddings=True, layer_pattern=("mamba",),
             position_embedding="none")
    if variant == "tiny":
        tiny_training(c)
        m.update(d_model=128, num_layers=4)
        m.ssm.update(d_state=16, head_dim=32, chunk_size=32)
    elif variant == "small":  # Mamba-2 780M
        m.update(vocab_size=50_280, d_model=1536, num_layers=48, max_seq_len=4096, dtype="bfloat16")
        m.ssm.update(d_state=128, head_dim=64, chunk_size=256)
        c.data.seq_len, c.data.batch_size = 2048, 8
    else:  # Mamba-2 2.7B
        m.update(vocab_size=50_280, d_model=2560, num_layers=64, max_seq_len=4096, dtype="bfloat16")
        m.ssm.update(d_state=128, head_dim=64, chunk_size=256)
