"""Every decoder family's tiny config trains through train.py; on a GPU, with the
compiled Pallas attention kernels, on the reference's loss curve within bf16 noise."""
import jax
import numpy as np
import pytest
from trainer_helpers import assert_kernel_curve_within_bf16_noise, family_config

from train import train_and_evaluate
from trainer.config import check_config
from trainer.metrics import read_metrics

# Families train.py trains (next-token prediction); bert and t5 are not decoders.
DECODER_FAMILIES = ["llama3", "mistral", "mixtral", "qwen", "smollm3", "olmo2", "gemma3",
                    "deepseek_v3", "kimi_k2", "llama4", "gpt2", "hybrid"]


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_tiny_config_passes_train_checks(family, corpus):
    """`python train.py --config=configs/<family>.py:tiny` gets past the config checks
    (kimi_k2's MuonClip once failed them: QK-Clip without the max logits it reads)."""
    check_config(family_config(family, corpus), num_devices=1)


def _losses(workdir, steps):
    curve = {r["step"]: r["loss"] for r in read_metrics(f"{workdir}/metrics.jsonl")
             if r["split"] == "train"}
    return np.array([curve[s] for s in range(1, steps + 1)])


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled Pallas GPU kernels: runs on a GPU")
@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_family_trains_with_pallas_gpu_like_the_reference(family, corpus, tmp_path, monkeypatch):
    """bf16 training with attention_impl='pallas_gpu' stays as close to the bf16
    reference as bf16 itself stays to f32 (plus a small floor); the kernels ran."""
    from pallas_kernels.flash_attention import gpu

    traced = []
    for name in ("_fwd_call", "_bwd_call"):
        original = getattr(gpu, name)
        monkeypatch.setattr(gpu, name, lambda *a, _f=original, _n=name, **k: (
            traced.append(_n), _f(*a, **k))[1])
    steps, losses = 12, {}
    for impl, dtype in (("reference", "float32"), ("reference", "bfloat16"),
                        ("pallas_gpu", "bfloat16")):
        cfg = family_config(family, corpus, seq_len=128, batch_size=8, steps=steps)
        cfg.model.update(attention_impl=impl, dtype=dtype)
        workdir = str(tmp_path / f"{impl}_{dtype}")
        train_and_evaluate(cfg, workdir)
        losses[impl, dtype] = _losses(workdir, steps)
    assert {"_fwd_call", "_bwd_call"} <= set(traced)
    assert_kernel_curve_within_bf16_noise(losses, family)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled Pallas GPU kernels: runs on a GPU")
def test_hybrid_trains_with_the_ssd_kernel_like_the_chunked_form(corpus, tmp_path, monkeypatch):
    """The Mamba-2 layers' SSD with the Pallas GPU kernels (forward and backward) trains on
    the chunked jnp form's bf16 curve within bf16 noise; the kernels ran."""
    from pallas_kernels.ssd import gpu, gpu_bwd

    traced = []
    for module, name in ((gpu, "ssd_forward"), (gpu_bwd, "ssd_backward")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **k: (
            traced.append(_n), _f(*a, **k))[1])
    from pallas_kernels.ssd import api
    monkeypatch.setitem(api._BACKENDS, "pallas_gpu", gpu.ssd_forward)
    monkeypatch.setitem(api._BACKWARDS, "pallas_gpu", gpu_bwd.ssd_backward)
    steps, losses = 12, {}
    for impl, dtype in (("chunked", "float32"), ("chunked", "bfloat16"), ("pallas_gpu", "bfloat16")):
        cfg = family_config("hybrid", corpus, seq_len=128, batch_size=8, steps=steps)
        cfg.model.update(attention_impl="pallas_gpu", dtype=dtype)
        cfg.model.ssm.impl = impl
        workdir = str(tmp_path / f"{impl}_{dtype}")
        train_and_evaluate(cfg, workdir)
        losses["reference" if impl == "chunked" else impl, dtype] = _losses(workdir, steps)
    assert {"ssd_forward", "ssd_backward"} <= set(traced)
    assert_kernel_curve_within_bf16_noise(losses, "hybrid ssd")
