"""Make the tiny Hugging Face fixtures that tests/arch/test_hf.py checks our models against.

For each family, build a tiny randomly initialised transformers model (eager attention,
f32), save it with `save_pretrained` under tests/fixtures/hf/<name>/ with `input_ids.npy`
[2, 24] and the reference `logits.npy` from transformers. Weights are drawn at a scale
that gives O(1) logits and non-trivial norms, biases and router biases, so that a wrong
mapping shows up as a large logit difference.

With `--check`, also load each fixture with `arch.hf.load`, compare logits, export it
with `arch.hf.save`, load the export back in transformers and compare its logits with
the reference (the export direction; needs jax in the same environment).

Needs torch and transformers (not needed by the tests):

    python -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install torch transformers safetensors numpy
    /tmp/hfvenv/bin/python tools/make_hf_fixtures.py [--only llama,gpt2] [--check]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch
import transformers

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "hf")
BATCH, SEQ = 2, 24

_DECODER = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                rms_norm_eps=1e-5, pad_token_id=None, bos_token_id=None, eos_token_id=None)

FIXTURES = {
    # Llama 3.1-style rope scaling; untied head.
    "llama": ("LlamaConfig", dict(_DECODER, rope_theta=10_000.0, rope_scaling=dict(
        rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    # A window of 8 on a 24-token sequence.
    "mistral": ("MistralConfig", dict(_DECODER, sliding_window=8, rope_theta=10_000.0)),
    "mixtral": ("MixtralConfig", dict(_DECODER, num_local_experts=4, num_experts_per_tok=2,
                                      intermediate_size=48, rope_theta=1e6)),
    # QKV bias, tied embeddings.
    "qwen2": ("Qwen2Config", dict(_DECODER, tie_word_embeddings=True, rope_theta=1e6)),
    # head_dim != hidden / heads, per-head QK-norm.
    "qwen3": ("Qwen3Config", dict(_DECODER, head_dim=32, rope_theta=1e6)),
    # First layer dense (mlp_only_layers), top-k weights not renormalised.
    "qwen3_moe": ("Qwen3MoeConfig", dict(_DECODER, num_hidden_layers=3, head_dim=16, num_experts=8,
                                         num_experts_per_tok=2, moe_intermediate_size=32,
                                         norm_topk_prob=False, mlp_only_layers=[0],
                                         decoder_sparse_step=1, rope_theta=1e6)),
    # 2 local (window 8, theta 10k) : 1 global (theta 1M, linear scaling 2) layers.
    "gemma3": ("Gemma3TextConfig", dict(_DECODER, num_hidden_layers=3, head_dim=16,
                                        layer_types=["sliding_attention", "sliding_attention",
                                                     "full_attention"],
                                        sliding_window=8, query_pre_attn_scalar=16,
                                        rms_norm_eps=1e-6, rope_parameters={
                                            "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                               "rope_theta": 1e6},
                                            "sliding_attention": {"rope_type": "default",
                                                                  "rope_theta": 10_000.0}})),
    "olmo2": ("Olmo2Config", dict(_DECODER, rope_theta=500_000.0)),
    # q-LoRA, group-limited sigmoid routing, shared expert, 1 dense layer first, YaRN.
    "deepseek_v3": ("DeepseekV3Config", dict(
        vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
        n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
        first_k_dense_replace=1, routed_scaling_factor=2.5, q_lora_rank=32, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=64,
        rms_norm_eps=1e-6, num_mtp_layers=0, pad_token_id=None, rope_parameters=dict(
            rope_type="yarn", rope_theta=10_000.0, factor=4.0, original_max_position_embeddings=16,
            beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0))),
    "gpt2": ("GPT2Config", dict(vocab_size=160, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    # Every 3rd layer without RoPE.
    "smollm3": ("SmolLM3Config", dict(_DECODER, num_hidden_layers=3, no_rope_layer_interval=3,
                                      rope_theta=5e6)),
    # Mamba-2: 8 heads of 16 channels, 2 groups of B/C, chunks of 8 (3 per sequence), tied.
    "mamba2": ("Mamba2Config", dict(vocab_size=160, hidden_size=64, num_hidden_layers=2, expand=2,
                                    head_dim=16, num_heads=8, n_groups=2, state_size=16,
                                    conv_kernel=4, chunk_size=8, layer_norm_epsilon=1e-5,
                                    tie_word_embeddings=True, pad_token_id=None,
                                    bos_token_id=None, eos_token_id=None)),
}


@torch.no_grad()
def randomise(model, seed: int) -> None:
    """O(1)-logit random weights: matrices N(0, 1/fan_in), norms 1 + N(0, 0.1) (Gemma: N(0, 0.1)),
    biases N(0, 0.1), embeddings N(0, 1), router biases N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    gemma = model.config.model_type.startswith("gemma")
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if "embed" in name or "wte" in name or "wpe" in name:
            p.copy_(noise)
        elif p.ndim == 1 and ("norm" in name or ".ln_" in name):
            p.copy_(0.1 * noise + (0.0 if gemma and name.endswith("weight") else 1.0)
                    if name.endswith("weight") else 0.1 * noise)
        elif p.ndim == 1:
            p.copy_(0.1 * noise)
        else:
            fan_in = p.shape[0] if "c_" in name and model.config.model_type == "gpt2" else p.shape[-1]
            p.copy_(noise / fan_in**0.5)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=g))


def make(name: str, seed: int) -> str:
    cls_name, kwargs = FIXTURES[name]
    config = getattr(transformers, cls_name)(**kwargs)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                                          dtype=torch.float32).eval()
    randomise(model, seed)
    out = os.path.join(OUT, name)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for extra in ("generation_config.json",):
        if os.path.exists(os.path.join(out, extra)):
            os.remove(os.path.join(out, extra))
    ids = np.random.default_rng(seed).integers(0, config.vocab_size, (BATCH, SEQ)).astype(np.int32)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    logits = hf_logits(reloaded, ids)
    np.testing.assert_allclose(logits, hf_logits(model, ids), atol=1e-6)  # the save is complete
    np.save(os.path.join(out, "input_ids.npy"), ids)
    np.save(os.path.join(out, "logits.npy"), logits)
    return out


@torch.no_grad()
def hf_logits(model, ids) -> np.ndarray:
    return model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()


def check(name: str) -> tuple[float, float]:
    """Max |logit difference| of (our load vs transformers, transformers on our export vs reference)."""
    sys.path.insert(0, ROOT)
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from arch import hf

    path = os.path.join(OUT, name)
    ids, ref = np.load(os.path.join(path, "input_ids.npy")), np.load(os.path.join(path, "logits.npy"))
    model, cfg = hf.load(path)
    ours = np.asarray(model(jax.numpy.asarray(ids))[0])
    with tempfile.TemporaryDirectory() as tmp:
        hf.save(model, cfg, tmp)
        exported = transformers.AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="eager").eval()
        back = hf_logits(exported, ids)
    return float(np.abs(ours - ref).max()), float(np.abs(back - ref).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated fixture names (default: all)")
    parser.add_argument("--check", action="store_true", help="also check arch.hf load and export")
    parser.add_argument("--no-make", action="store_true", help="only --check existing fixtures")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(FIXTURES)
    for i, name in enumerate(names):
        if not args.no_make:
            out = make(name, seed=i)
            size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
            print(f"{name}: {size / 1e3:.0f} kB, transformers {transformers.__version__}")
        if args.check:
            load_err, export_err = check(name)
            print(f"  {name}: |ours - hf| = {load_err:.2e}, |hf(our export) - hf| = {export_err:.2e}")


if __name__ == "__main__":
    main()
