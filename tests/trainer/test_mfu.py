"""FLOPs per token against nanoGPT's published GPT-2 numbers and brute-force counts."""
import numpy as np
import pytest

from configs.base import model_defaults
from configs.gpt2 import get_config as gpt2_config
from configs.llama3 import get_config
from trainer.mfu import flops_per_token, matmul_params, mean_context, mfu, peak_flops

# nanoGPT (karpathy/nanoGPT, model.py): GPT-2 small prints "number of parameters: 123.65M",
# get_num_params(non_embedding=True) = 124,439,808 total - 786,432 position table.
GPT2_NON_EMBEDDING = 123_653_376


def gpt2_small():
    return gpt2_config("full").model        # configs/gpt2.py: 124M, seq 1024


def test_gpt2_small_matches_nanogpt_estimate_mfu():
    cfg = gpt2_small()
    assert matmul_params(cfg) == GPT2_NON_EMBEDDING
    # nanoGPT estimate_mfu: flops_per_token = 6N + 12 L H Q T (no causal halving).
    L, H, Q, T = 12, 12, 64, 1024
    want = 6 * GPT2_NON_EMBEDDING + 12 * L * H * Q * T
    assert flops_per_token(cfg, T, causal_halving=False) == want
    assert flops_per_token(cfg, T) == 6 * GPT2_NON_EMBEDDING + 6 * L * H * Q * T
    # nanoGPT's example: 12 x 1024 tokens x 40 accumulation per iteration, A100 peak 312e12.
    tokens_per_s = 12 * 1024 * 40 / 1.0
    assert mfu(tokens_per_s, want, "NVIDIA A100-SXM4-40GB") == pytest.approx(
        want * tokens_per_s / 312e12)


def test_untied_embedding_table_is_not_counted_but_the_head_is():
    cfg = get_config("tiny").model            # untied: embedding [V, D] and head [D, V]
    d, v, f, L = cfg.d_model, cfg.vocab_size, cfg.mlp_dim, cfg.num_layers
    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    per_layer = d * hd * (h + 2 * kv) + h * hd * d + 3 * d * f + 2 * d   # qkv, o, swiglu, 2 norms
    assert matmul_params(cfg) == L * per_layer + d + d * v                # + final norm + head


@pytest.mark.parametrize("window,seq", [(16, 64), (48, 64), (100, 64)])
def test_sliding_window_context_is_the_brute_force_mean(window, seq):
    cfg = model_defaults()
    cfg.sliding_window = window
    brute = np.mean([min(t + 1, window) for t in range(seq)])      # keys seen by query t
    # The formula drops the +1/2 of the discrete sum: within half a key.
    assert abs(mean_context("local", seq, cfg) - brute) <= 0.5 + 1e-9
    assert abs(mean_context("global", seq, cfg) - np.mean(np.arange(1, seq + 1))) <= 0.5


def test_device_peaks():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("TPU v4") == 275e12
    assert peak_flops("TPU v5 lite") == 197e12
    assert peak_flops("TPU v5p") == 459e12
    assert peak_flops("TPU v6 lite") == 918e12
    assert peak_flops("cpu") is None
    assert mfu(1e6, 1e9, "cpu") is None
    assert mfu(1e5, 5e9, "NVIDIA H100 80GB HBM3", 2) == pytest.approx(1e5 * 5e9 / (2 * 989e12))


def test_hybrid_counts_attention_only_in_attention_layers_and_the_ssd_in_mamba_layers():
    from configs.hybrid import get_config as hybrid_config
    from trainer.mfu import attention_flops_per_token, ssd_flops_per_token

    cfg = hybrid_config("full,arch=nemotron_h").model   # 4 attention, 24 Mamba-2, 24 MLP
    t = 8192
    assert attention_flops_per_token(cfg, t) == 4 * 6 * (t / 2) * 32 * (128 + 128)
    h, p, n, q = 128, 64, 128, 256
    assert ssd_flops_per_token(cfg, t) == 24 * 6 * h * (q / 2 * (n + p) + 2 * p * n)
