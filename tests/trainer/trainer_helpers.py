"""Helpers of the trainer tests: a small text corpus and a tiny config over it."""
import os

from configs.llama3 import get_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_corpus(root) -> tuple[str, str]:
    """(train dir, validation file) of varied Python-like text, a few KB."""
    root.mkdir(parents=True, exist_ok=True)
    train = root / "train"
    train.mkdir(exist_ok=True)
    for i in range(6):
        lines = [f"def f{i}_{j}(x, y={j}):\n    return x * {i} + y - {j * j}\n" for j in range(25)]
        (train / f"m{i}.py").write_text("".join(lines))
    val = root / "val.py"
    val.write_text("".join(f"def g{j}(a):\n    return a + {j}\n" for j in range(40)))
    return str(train), str(val)


def tiny_config(corpus: tuple[str, str], **train):
    """d_model 32, 2 layers, seq 32, batch 4, constant lr, no sample: seconds per run."""
    cfg = get_config("tiny")
    cfg.model.update(d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                     mlp_dim=64, max_seq_len=64)
    cfg.data.update(source=corpus[0], val_source=corpus[1], seq_len=32, batch_size=4)
    cfg.optim.update(schedule="constant", warmup_steps=1, lr=1e-2)
    cfg.train.update(steps=6, eval_every=0, eval_batches=1, log_every=1, checkpoint_every=2,
                     keep_checkpoints=3, sample_tokens=0)
    cfg.train.update(train)
    cfg.mesh.data = 1
    return cfg


def family_config(family: str, corpus: tuple[str, str], *, seq_len: int = 32, batch_size: int = 4,
                  **train):
    """configs/<family>.py:tiny over the test corpus: constant lr, no eval, no sample."""
    import importlib

    cfg = importlib.import_module(f"configs.{family}").get_config("tiny")
    cfg.data.update(source=corpus[0], val_source=corpus[1], seq_len=seq_len, batch_size=batch_size)
    cfg.model.max_seq_len = max(cfg.model.max_seq_len, seq_len)
    cfg.optim.update(schedule="constant", warmup_steps=1, lr=1e-3)
    cfg.train.update(steps=4, eval_every=0, eval_batches=1, log_every=1, checkpoint_every=0,
                     sample_tokens=0)
    cfg.train.update(train)
    cfg.mesh.data = 1
    return cfg


def assert_kernel_curve_within_bf16_noise(losses, name: str):
    """losses[(impl, dtype)]: loss curves of ("reference", "float32"), ("reference",
    "bfloat16") and ("pallas_gpu", "bfloat16"). The kernel's bf16 curve must stay as close
    to the bf16 reference as bf16 itself stays to f32 (twice that, plus a 0.02 floor)."""
    import numpy as np

    ours, ref, ref32 = (losses["pallas_gpu", "bfloat16"], losses["reference", "bfloat16"],
                        losses["reference", "float32"])
    bf16_noise = np.abs(ref - ref32).max()
    print(f"{name}: max |pallas_gpu - reference| {np.abs(ours - ref).max():.4f}, bf16 vs f32 "
          f"{bf16_noise:.4f}, loss {ref[0]:.3f} -> {ref[-1]:.3f}")
    np.testing.assert_allclose(ours, ref, atol=2 * bf16_noise + 0.02)
    assert ref[-1] < ref[0]  # it does train
