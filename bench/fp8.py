"""FP8 against bf16 (model.matmul_precision, arch/precision.py), in one run.

    python bench/fp8.py                                  # speed and loss, on a GPU
    python bench/fp8.py --smoke                          # tiny shapes: checks the script on CPU

1. Speed: tokens/s of train.py's step on train.py's batches (bench/train_mfu.py, data
   "train") for llama3-small and gpt2-1.3b at batch 4 x 4096, for bf16 and each FP8 mode,
   with ratios to bf16. Also the bare matmul (fwd+bwd of one projection of the model's
   width, 16k tokens) per mode, to tell the matmul's gain from the step's.
2. Loss: `train_and_evaluate` of a small Llama on the stdlib corpus for --loss_steps
   steps per mode, final train and validation loss and their ratio to bf16.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from arch.precision import MATMUL_PRECISIONS, dot  # noqa: E402
from bench import train_mfu  # noqa: E402
from bench.timing import median_time  # noqa: E402

FAST_MODES = ("bf16", "fp8_tensorwise", "fp8_rowwise")   # blockwise: numerics only (no kernel)


def time_matmul(m: int, k: int, n: int, mode: str, reps: int = 5) -> float:
    """Seconds of forward + backward of one [m, k] @ [k, n] in bf16 inputs (median)."""
    x = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (k, n), jnp.bfloat16) * 0.02
    dy = jax.random.normal(jax.random.key(2), (m, n), jnp.bfloat16)

    def fwd_bwd(x, w, dy):  # a random cotangent: nothing for XLA to simplify away
        y, vjp = jax.vjp(lambda a, b: dot(a, b, mode), x, w)
        return y, vjp(dy)

    return median_time(jax.jit(fwd_bwd), x, w, dy, reps=reps)


def loss_run(mode: str, steps: int, smoke: bool, seed: int = 0) -> dict:
    from configs.llama3 import get_config
    from train import train_and_evaluate
    cfg = get_config("tiny")
    if not smoke:  # ~20M parameters: big enough that every projection is a real matmul
        cfg.model.update(d_model=512, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=64,
                         mlp_dim=1536, max_seq_len=512, dtype="bfloat16")
        cfg.data.update(seq_len=512, batch_size=32)
    cfg.model.matmul_precision = mode
    cfg.seed = seed  # initialisation and batch order
    cfg.optim.update(warmup_steps=min(100, steps // 10))
    cfg.train.update(steps=steps, eval_every=0, eval_batches=16, log_every=max(1, steps // 20),
                     checkpoint_every=0, sample_tokens=0)
    with tempfile.TemporaryDirectory() as workdir:
        r = train_and_evaluate(cfg, workdir, progress=False)
    return {"train_loss": r["train_loss"], "val_loss": r["val_loss"], "tokens_per_s": r["tokens_per_s"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="llama3-small,gpt2-1.3b")
    p.add_argument("--modes", default=",".join(FAST_MODES), help=f"comma list of {MATMUL_PRECISIONS}")
    p.add_argument("--loss_steps", type=int, default=2000)
    p.add_argument("--loss_modes", default="bf16,fp8_rowwise", help="modes of the loss runs")
    p.add_argument("--seeds", default="0", help="comma list of seeds of the loss runs (the "
                   "spread between seeds says how much of a gap is noise)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: speed,matmul,loss")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    skip = set(filter(None, args.skip.split(",")))
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    if "matmul" not in skip:
        shapes = [(256, 256, 256)] if args.smoke else [(16384, 2048, 5632), (16384, 5632, 2048),
                                                       (16384, 2048, 8192)]
        print("\n| matmul fwd+bwd (M, K, N) | " + " | ".join(modes) + " |", flush=True)
        print("|---|" + "---|" * len(modes))
        for m, k, n in shapes:
            t = {mode: time_matmul(m, k, n, mode, reps=2 if args.smoke else 5) for mode in modes}
            cells = [f"{t[mode] * 1e3:.2f} ms ({6 * m * k * n / t[mode] / 1e12:.0f} TFLOP/s, "
                     f"{t['bf16'] / t[mode]:.2f}x)" for mode in modes]
            print(f"| {m} x {k} x {n} | " + " | ".join(cells) + " |", flush=True)
    if "speed" not in skip:
        rows = []
        for name in args.models.split(","):
            for mode in modes:
                ns = argparse.Namespace(smoke=args.smoke, seq=4096, batch=4, steps=2 if args.smoke else 10,
                                        warmup=1 if args.smoke else 3, remat="none",
                                        attention="auto", profile=None, precision=mode)
                try:
                    rows.append(train_mfu.run_model(name, ns, "train"))
                except Exception as e:  # noqa: BLE001 - report and go on
                    rows.append({"model": name, "precision": mode, "error": str(e).splitlines()[0][:200]})
                print(rows[-1], flush=True)
        print("\n| model | precision | step (s) | tokens/s | MFU (bf16 peak) | vs bf16 |")
        print("|---|---|---|---|---|---|")
        base = {r["model"]: r.get("tokens_per_s") for r in rows if r["precision"] == "bf16"}
        for r in rows:
            tps = r.get("tokens_per_s")
            if not tps:
                print(f"| {r['model']} | {r['precision']} | - | {r.get('error', 'OOM')} | | |")
                continue
            ratio = f"{tps / base[r['model']]:.2f}x" if base.get(r["model"]) else ""
            print(f"| {r['model']} | {r['precision']} | {r['step_s']:.3f} | {tps:,.0f} | "
                  f"{train_mfu.format_mfu(r['mfu'])} | {ratio} |", flush=True)
    if "loss" not in skip:
        steps = 4 if args.smoke else args.loss_steps
        seeds = [int(x) for x in args.seeds.split(",")]
        print(f"\n| precision | seed | train loss @ {steps} | val loss | val vs bf16 (same seed) | tokens/s |")
        print("|---|---|---|---|---|---|")
        for seed in seeds:
            out = {mode: loss_run(mode, steps, args.smoke, seed) for mode in args.loss_modes.split(",")}
            for mode, r in out.items():
                print(f"| {mode} | {seed} | {r['train_loss']:.4f} | {r['val_loss']:.4f} | "
                      f"{r['val_loss'] / out['bf16']['val_loss'] - 1:+.2%} | "
                      f"{r['tokens_per_s'] or 0:,.0f} |", flush=True)

if __name__ == "__main__":
    main()
