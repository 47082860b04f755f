"""Training throughput and MFU of train.py's step on one accelerator, for two ~1B models.

    python bench/train_mfu.py                                  # both models, one GPU/TPU
    python bench/train_mfu.py --models=gpt2-1.3b --remat=full --batch=4
    python bench/train_mfu.py --smoke                          # tiny shapes: checks the script on CPU

Models (bf16 compute, f32 parameters and AdamW state, as train.py trains them):
  llama3-small  configs/llama3.py:small: 16 layers, d_model 2048, 16 heads (8 KV), SwiGLU 5632,
                vocab 32000, 0.89B parameters
  deepseek-v3-small  configs/deepseek_v3.py:small: MLA, 64 routed experts top-6 + 1 shared
  gpt2-1.3b     GPT-2 layout at 1.3B: 24 layers, d_model 2048, 16 heads of 128, GELU MLP 8192,
                LayerNorm, learned positions, tied embeddings, vocab 50304 (nanoGPT's padded
                GPT-2 vocabulary), no biases (as nanoGPT's bench.py, bias=False)
Both at batch 4 x seq 4096 by default. The step is `trainer.step.train_step`: forward,
backward, AdamW update. Two kinds of data (`--data`, both by default):
  random  random tokens, one document per row, no segment ids: the causal-only mask of
          nanoGPT's bench.py (a shortcut: train.py never sends such batches)
  train   what train.py runs: the packed batches of its loader (data.source, default the
          stdlib corpus, byte tokens) with segment ids and positions, moved to the mesh
          by `device_batch` and fed to the bound step, the loader's host time included

MFU (trainer/mfu.py) counts 6 N per token for the weight matmuls plus the attention
scores and values at half the square for causal layers (PaLM's 12 L T d, halved);
recomputation under remat is not counted. The GPT-2 row also shows nanoGPT's
un-halved count, the way nanoGPT's estimate_mfu reports it, and compares tokens/s
with NANOGPT_H100_TOKENS_PER_S: 55.9k tokens/s for this GPT-2 1.3B at batch 4 x 4096
on one H100 (the reference figure for this benchmark).

`--remat=auto` tries no rematerialisation, then dots_saveable, then full, and reports
the first that fits in memory.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import arch  # noqa: E402
import data  # noqa: E402
import optim  # noqa: E402
import sharding  # noqa: E402
from configs.deepseek_v3 import get_config as deepseek_v3_config  # noqa: E402
from configs.gpt2 import get_config as gpt2_config  # noqa: E402
from configs.hybrid import get_config as hybrid_config  # noqa: E402
from configs.llama3 import get_config as llama3_config  # noqa: E402
from configs.mixtral import get_config as mixtral_config  # noqa: E402
from pallas_kernels.flash_attention.api import impl_lacks  # noqa: E402
from trainer.mesh import device_batch, setup  # noqa: E402
from trainer.mfu import flops_per_token, format_mfu, mfu, peak_flops  # noqa: E402
from trainer.step import StepOptions, bind_train_step  # noqa: E402

NANOGPT_H100_TOKENS_PER_S = 55_900
REMATS = ("none", "dots_saveable", "full")
DATA_KINDS = ("random", "train")
PROFILE_STEPS = 3


def llama3_small():
    return llama3_config("small")


def gpt2_13b():
    c = gpt2_config("small,size=1.3b")  # 24 layers, d 2048, 16 heads, seq 4096, bf16
    c.model.vocab_size = 50304          # nanoGPT pads GPT-2's 50257 to a multiple of 64
    # nanoGPT's bench.py runs bias=False: no bias in any Linear or LayerNorm. Same model here.
    c.model.update(attn_bias=False, attn_out_bias=False, mlp_bias=False, norm_bias=False)
    return c


def deepseek_v3_small():
    return deepseek_v3_config("small")  # MLA + 64 experts top-6, 12 layers (1 dense)


def mixtral_small():
    return mixtral_config("small")  # 8 experts top-2, d 1024, 8 layers, expert width 3584


def nemotron_h_small():
    return hybrid_config("small,arch=nemotron_h")  # ~1B hybrid: 16 Mamba-2, 16 MLP, 4 attention


MODELS = {"llama3-small": llama3_small, "gpt2-1.3b": gpt2_13b, "deepseek-v3-small": deepseek_v3_small,
          "mixtral-small": mixtral_small, "nemotron-h-small": nemotron_h_small}


def smoke(cfg):
    """Same layout, toy sizes: for checking this script anywhere."""
    cfg.model.update(d_model=64, num_layers=2, head_dim=16, mlp_dim=128, vocab_size=512,
                     max_seq_len=128, num_heads=4, num_kv_heads=min(cfg.model.num_kv_heads, 4))
    if cfg.model.get("ssm") is not None:  # Mamba-2 mixers: heads = expand * d_model / head_dim
        cfg.model.ssm.update(d_state=16, head_dim=16, n_groups=1, chunk_size=32)
    return cfg


def random_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
    """Random tokens, one document per row: no segment ids (as nanoGPT: causal mask only)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, seq + 1)).astype(np.int32)
    return {"tokens": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
            "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq)),
            "loss_mask": jnp.ones((batch, seq), jnp.float32)}


def train_batches(cfg, batch: int, seq: int):
    """train.py's batches: its loader over cfg.data (packed, with segment ids) on the mesh.

    Returns (an iterator of device batches, mean documents per row of the first batch).
    """
    cfg.data.update(batch_size=batch, seq_len=seq)
    mesh, rules = setup(cfg)
    loader = data.build_dataset(cfg.data).train_loader(seed=cfg.seed)
    first = next(loader)
    docs_per_row = float(np.mean(first["segment_ids"].max(axis=1)))
    loader.set_state({**loader.get_state(), "row": 0})

    def batches():
        while True:
            yield device_batch(next(loader), mesh, rules)

    return mesh, rules, batches(), docs_per_row


def measure(cfg, *, batch: int, seq: int, steps: int, warmup: int, data_kind: str = "random",
            profile: str | None = None) -> dict:
    """Seconds per step of train_step after `warmup` steps (the first compiles).

    data_kind "random": one random batch fed again and again; "train": a fresh batch of
    train.py's loader every step, loading and transfer inside the timed loop, as in
    train.py.
    """
    model = arch.build_model(cfg.model, nnx.Rngs(params=0))
    tx = optim.build_optimizer(cfg.optim, nnx.state(model, nnx.Param), total_steps=10_000)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    opts = StepOptions.from_config(cfg)
    out = {}
    if data_kind == "train":
        mesh, rules, feed, out["docs_per_row"] = train_batches(cfg, batch, seq)
        sharding.shard_state(model, optimizer, mesh=mesh, rules=rules)
        context = sharding.activate(mesh, rules)
    else:
        fixed = random_batch(batch, seq, cfg.model.vocab_size)
        feed, context = iter(lambda: fixed, None), contextlib.nullcontext()
    step = bind_train_step(model, optimizer)
    with context:
        for _ in range(warmup):
            jax.block_until_ready(step(next(feed), opts=opts))
        start = time.perf_counter()
        for _ in range(steps):
            metrics = step(next(feed), opts=opts)
        jax.block_until_ready(metrics)
        seconds = (time.perf_counter() - start) / steps
        out.update(step_s=seconds, loss=float(metrics["loss"]))
        if profile:  # a few more steps under the profiler, summarised by kernel kind
            from bench.trace_summary import summarise
            with jax.profiler.trace(profile, create_perfetto_trace=True):
                for _ in range(PROFILE_STEPS):
                    metrics = step(next(feed), opts=opts)
                jax.block_until_ready(metrics)
            out["profile"] = summarise(profile, steps=PROFILE_STEPS)
    return out


def is_oom(e: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def run_model(name: str, args, data_kind: str = "random") -> dict:
    cfg = MODELS[name]()
    if args.smoke:
        cfg = smoke(cfg)
    seq = min(args.seq, cfg.model.max_seq_len)
    cfg.model.attention_impl = args.attention
    cfg.model.scan_layers = getattr(args, "scan_layers", False)
    cfg.model.matmul_precision = getattr(args, "precision", "bf16")
    if cfg.model.get("ssm") is not None:
        cfg.model.ssm.impl = getattr(args, "ssd_impl", "auto")
    cfg.train.z_loss = 0.0
    total, active = arch.count_params(cfg.model)
    row = {"model": name, "data": data_kind, "params": total, "batch": args.batch, "seq": seq,
           "precision": cfg.model.matmul_precision, "scan_layers": cfg.model.scan_layers}
    if cfg.model.get("ssm") is not None:
        row["ssd_impl"] = cfg.model.ssm.impl
    if data_kind == "train" and impl_lacks(args.attention, ["segment_ids"]):
        # train.py refuses this config before compute (trainer/config.py): so does the bench.
        return {**row, "remat": f"cannot run: {args.attention} has no segment ids", "step_s": None}
    for remat in (REMATS if args.remat == "auto" else (args.remat,)):
        cfg.model.remat = remat
        try:
            profile = args.profile and os.path.join(args.profile,
                                                    f"{name}-{args.attention}-{data_kind}")
            row.update(measure(cfg, batch=args.batch, seq=seq, steps=args.steps,
                               warmup=args.warmup, data_kind=data_kind, profile=profile),
                       remat=remat)
            break
        except Exception as e:  # noqa: BLE001 - out of memory: try the next remat policy
            if not is_oom(e):
                raise
            row.update(remat=f"{remat}: OOM", step_s=None)
        finally:
            gc.collect()
            jax.clear_caches()
    device = jax.devices()[0]
    tokens = args.batch * seq
    row["flops_per_token"] = flops_per_token(cfg.model, seq)
    row["flops_per_token_nanogpt"] = flops_per_token(cfg.model, seq, causal_halving=False)
    if row.get("step_s"):
        tps = tokens / row["step_s"]
        row["tokens_per_s"] = tps
        row["mfu"] = mfu(tps, row["flops_per_token"], device.device_kind)
        row["mfu_nanogpt"] = mfu(tps, row["flops_per_token_nanogpt"], device.device_kind)
        row["tflops"] = tps * row["flops_per_token"] / 1e12
    return row


def table(rows: list[dict], device_kind: str) -> str:
    peak = peak_flops(device_kind)
    lines = [f"device: {device_kind} (bf16 dense peak "
             f"{'unknown' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}), jax {jax.__version__}",
             "",
             "| model | data | params | batch x seq | remat | step (s) | tokens/s | TFLOP/s | MFU | "
             "MFU (nanoGPT count) | vs nanoGPT 55.9k tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tps = r.get("tokens_per_s")
        vs = (f"{tps / NANOGPT_H100_TOKENS_PER_S:.2f}x" if tps and r["model"] == "gpt2-1.3b"
              else "")
        kind = r["data"] + (f" ({r['docs_per_row']:.1f} docs/row)" if "docs_per_row" in r else "")
        lines.append(
            f"| {r['model']} | {kind} | {r['params'] / 1e9:.2f}B | {r['batch']} x {r['seq']} | {r['remat']} | "
            + (f"{r['step_s']:.3f} | {tps:,.0f} | {r['tflops']:.0f} | {format_mfu(r['mfu'])} | "
               f"{format_mfu(r['mfu_nanogpt'])} | {vs} |" if tps else "- | - | - | - | - | - |"))
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {tuple(MODELS)}")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (the first compiles)")
    p.add_argument("--remat", default="auto", choices=("auto",) + REMATS)
    p.add_argument("--attention", default="auto", help="model.attention_impl")
    p.add_argument("--ssd_impl", default="auto", help="model.ssm.impl of the Mamba-2 layers")
    p.add_argument("--scan_layers", action="store_true", help="model.scan_layers=True: "
                   "nnx.scan over the layers, one compiled layer")
    p.add_argument("--data", default=",".join(DATA_KINDS),
                   help=f"comma list of {DATA_KINDS}: random rows, or train.py's loader")
    p.add_argument("--smoke", action="store_true", help="toy sizes, to check the script on CPU")
    p.add_argument("--profile", default=None, help="trace a few steps into this directory and "
                   "print where the GPU time goes (bench/trace_summary.py)")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = p.parse_args(argv)
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ValueError(f"--models {unknown} must be in {tuple(MODELS)}")
    kinds = args.data.split(",")
    if any(k not in DATA_KINDS for k in kinds):
        raise ValueError(f"--data={args.data!r} must be a comma list of {DATA_KINDS}")
    if jax.default_backend() == "cpu" and not args.smoke:
        sys.exit("bench/train_mfu.py measures ~1B models on a GPU or TPU; on CPU use --smoke")
    rows = []
    for name, kind in itertools.product(names, kinds):
        rows.append(run_model(name, args, kind))
        profile = rows[-1].pop("profile", None)
        print(f"{name} ({kind}): {rows[-1]}", flush=True)
        if profile:
            print(profile, flush=True)
    text = table(rows, jax.devices()[0].device_kind)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Training throughput and MFU (bench/train_mfu.py)\n\n" + text + "\n")


if __name__ == "__main__":
    main()
