"""nanoGPT's Shakespeare character "baby GPT" through train.py, beside nanoGPT itself.

nanoGPT's config/train_shakespeare_char.py: 6 layers, 6 heads, d 384, block 256, batch
64, dropout 0.2, AdamW lr 1e-3 cosine to 1e-4 over 5000 iterations, 100 warmup, beta2
0.99, weight decay 0.1, clip 1.0, no biases. Data: tiny Shakespeare (the 1.1 MB
input.txt of karpathy/char-rnn), first 90% train, last 10% validation, one character
per token (the text is ASCII, so our byte tokenizer sees the same characters).

    python bench/nanogpt_shakespeare.py --text=input.txt --workdir=runs/baby
    python bench/nanogpt_shakespeare.py --text=input.txt --workdir=runs/baby_moon --optim=moonlight
    python bench/nanogpt_shakespeare.py --text=input.txt --nanogpt_log=nanogpt.log   # table only

Prints the validation curve (every 250 steps, over the whole validation split), the
best validation loss and its step, the final train/validation loss and tokens/s; with
`--nanogpt_log` (the stdout of `python train.py config/train_shakespeare_char.py` in a
nanoGPT checkout) the same figures of nanoGPT and the ratios. Results:
bench/results/nanogpt_shakespeare.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# What differs from configs/gpt2.py:tiny, as nanoGPT's train_shakespeare_char.py sets it.
OVERRIDES = {
    "model.num_layers": 6, "model.num_heads": 6, "model.num_kv_heads": 6,
    "model.d_model": 384, "model.head_dim": 64, "model.mlp_dim": 1536,
    "model.max_seq_len": 256,
    "model.attn_bias": False, "model.attn_out_bias": False, "model.mlp_bias": False,
    "model.norm_bias": False,                 # nanoGPT's bias=False
    "model.dropout": 0.2,                     # embeddings, residual branches, attention
    "model.dtype": "bfloat16",
    "data.seq_len": 256, "data.batch_size": 64,
    "data.val_fraction": 0.1,                 # one document: its last 10% (nanoGPT's split)
    "optim.lr": 1e-3, "optim.min_lr_ratio": 0.1, "optim.b2": 0.99,
    "optim.warmup_steps": 100, "optim.schedule": "cosine",
    "train.steps": 5000, "train.z_loss": 0.0,  # nanoGPT has no z-loss
    "train.eval_every": 250, "train.eval_batches": 1000,  # the whole validation split
    "train.log_every": 50, "train.checkpoint_every": 1000,
    "train.sample_tokens": 0,
}


def build_config(text: str, optim_name: str, extra: dict):
    from configs.gpt2 import get_config
    cfg = get_config("tiny")
    for key, value in {**OVERRIDES, "data.source": text, "optim.name": optim_name, **extra}.items():
        section, _, field = key.partition(".")
        cfg[section][field] = value
    return cfg


def command_line(text: str, workdir: str, optim_name: str) -> str:
    flags = " ".join(f"--config.{k}={v}" for k, v in
                     {**OVERRIDES, "data.source": text, "optim.name": optim_name}.items())
    return f"python train.py --config=configs/gpt2.py:tiny --workdir={workdir} {flags}"


def our_figures(workdir: str) -> dict:
    from trainer.metrics import read_metrics
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    evals = [(r["step"], r["loss"]) for r in records if r["split"] == "eval"]
    train = [r for r in records if r["split"] == "train"]
    tps = [r["tokens_per_s"] for r in train if isinstance(r.get("tokens_per_s"), float)]
    best = min(evals, key=lambda e: e[1])
    return {"curve": evals, "best_val": best[1], "best_step": best[0],
            "final_val": evals[-1][1], "final_train": train[-1]["loss"],
            "tokens_per_s": sorted(tps)[len(tps) // 2] if tps else None}


def nanogpt_figures(log: str, tokens_per_iter: int = 64 * 256) -> dict:
    """From nanoGPT's stdout: 'step N: train loss A, val loss B' and 'iter N: ... time Tms'."""
    with open(log) as f:
        text = f.read()
    evals = [(int(s), float(tr), float(v)) for s, tr, v in
             re.findall(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", text)]
    times = [float(t) for i, t in re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", text)
             if int(i) > 100]                   # past compilation and warm-up
    best = min(evals, key=lambda e: e[2])
    ms = sorted(times)[len(times) // 2] if times else None
    return {"curve": [(s, v) for s, _, v in evals], "best_val": best[2], "best_step": best[0],
            "final_val": evals[-1][2], "final_train": evals[-1][1],
            "tokens_per_s": tokens_per_iter / (ms / 1e3) if ms else None}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--text", required=True, help="tiny Shakespeare input.txt")
    p.add_argument("--workdir", default=None, help="train here (omit: only read logs)")
    p.add_argument("--optim", default="adamw", help="adamw | muon | moonlight")
    p.add_argument("--nanogpt_log", default=None, help="nanoGPT's stdout of the same run")
    p.add_argument("--set", action="append", default=[], help="extra override key=value (JSON value)")
    args = p.parse_args(argv)
    extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    rows = {}
    if args.workdir:
        print(command_line(args.text, args.workdir, args.optim), flush=True)
        from train import train_and_evaluate
        train_and_evaluate(build_config(args.text, args.optim, extra), args.workdir)
        rows[f"train.py ({args.optim})"] = our_figures(args.workdir)
    if args.nanogpt_log:
        rows["nanoGPT"] = nanogpt_figures(args.nanogpt_log)
    ref = rows.get("nanoGPT")
    print("\n| run | best val (step) | val @ end | train @ end | tokens/s | vs nanoGPT |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        ratio = (f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x"
                 if ref and r["tokens_per_s"] and ref["tokens_per_s"] else "")
        tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "n/a"
        print(f"| {name} | {r['best_val']:.4f} ({r['best_step']}) | {r['final_val']:.4f} | "
              f"{r['final_train']:.4f} | {tps} | {ratio} |")
    for name, r in rows.items():
        print(f"{name} validation curve: " + ", ".join(f"{s}:{v:.3f}" for s, v in r["curve"]))


if __name__ == "__main__":
    main()
