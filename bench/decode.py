"""Decode benchmarks: the paged attention kernel, and the serving engine end to end.

Kernel part: paged attention throughput against its peers.

Decode attention reads every cached key and value once per generated token, so its
figure of merit is bandwidth: bytes of K/V read per second, and that as a fraction of
what a plain device copy achieves on the same machine. The kernel
(pallas_kernels/paged_attention, split-K over pages) is timed in one run against the
strongest peers available: jax's bundled Pallas paged-attention op for the platform
and the XLA reference (gather pages, then softmax).

    python bench/decode.py                           # CPU smoke test: tiny, interpret mode
    python bench/decode.py --device                  # accelerator: batch 8, 8k context,
                                                     # 32 q / 8 kv heads, D 128, page 16, bf16
    python bench/decode.py --device --sweep          # also sweep the GPU kernels' BlockSizes
    python bench/decode.py --device --sweep=hopper   # only the Mosaic GPU kernel's tiles
    python bench/decode.py --device --out=bench/results/paged_attention.md

Each timing is the median of `--iters` back-to-back calls (dispatched asynchronously,
so launch overhead overlaps), after a warm-up call that compiles.

Engine part (`--part=engine`): generated tokens per second of serving/engine.py on a
shared-prefix workload (few-shot prompting: every request starts with the same long
prefix, then its own question), paged KV cache with the radix prefix cache on vs
off. With it on, a request that finds the prefix cached prefills only its own
suffix. Same requests, same tokens (checked), each configuration timed on a fresh
engine after a warm-up run of the same workload that compiles every shape. On a GPU,
two more rows run radix off / on with the decode kernel forced to Triton
(`Engine(paged_block_sizes=...)`), so the two GPU kernels compare in one run.

    python bench/decode.py --part=engine                 # CPU: tiny model, 8 requests, 64-token prefix
    python bench/decode.py --part=engine --device        # llama3 `small` (~1B, bf16), 64 requests
                                                         # sharing a 2048-token prefix, 64 new tokens each
    python bench/decode.py --part=engine --device --requests=128 --prefix_len=4096
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

# Run as `python bench/decode.py` from a checkout without `pip install -e .`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pallas_kernels.paged_attention import gpu as paged_gpu  # noqa: E402
from pallas_kernels.paged_attention import gpu_hopper as paged_hopper  # noqa: E402
from pallas_kernels.paged_attention import paged_attention  # noqa: E402

PARTS = ("kernel", "engine", "all")


def make_inputs(*, batch, heads, kv_heads, head_dim, context, page_size, dtype, seed=0):
    """Full-length sequences whose pages are scattered at random over the pool."""
    max_pages = context // page_size
    num_pages = batch * max_pages
    key = jax.random.key(seed)
    kq, kk, kv, kp = jax.random.split(key, 4)
    q = jax.random.normal(kq, (batch, heads, head_dim), dtype)
    k_pages = jax.random.normal(kk, (kv_heads, num_pages, page_size, head_dim), dtype)
    v_pages = jax.random.normal(kv, (kv_heads, num_pages, page_size, head_dim), dtype)
    table = jax.random.permutation(kp, num_pages).reshape(batch, max_pages).astype(jnp.int32)
    lengths = jnp.full((batch,), context, jnp.int32)
    return q, k_pages, v_pages, lengths, table


def time_fn(fn, *args, iters: int) -> float:
    """Median seconds per call over `iters` calls, each batch of 5 calls timed together."""
    jax.block_until_ready(fn(*args))  # compile + warm up
    samples = []
    for _ in range(max(1, iters // 5)):
        t0 = time.perf_counter()
        for _ in range(5):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / 5)
    return statistics.median(samples)


def copy_bandwidth(num_bytes: int, iters: int) -> float:
    """Bytes/s of an elementwise device copy (read + write) of `num_bytes`."""
    x = jnp.ones((num_bytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda x: x + 1)
    return 2 * num_bytes / time_fn(f, x, iters=iters)


def read_bandwidth(num_bytes: int, iters: int) -> float:
    """Bytes/s of a device reduction that reads `num_bytes` (and writes nothing): decode
    attention only reads, and can beat a copy, whose writes share the memory bus."""
    x = jnp.ones((num_bytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
    return num_bytes / time_fn(f, x, iters=iters)


def peers(platform: str, interpret: bool):
    """name -> fn(q, k_pages, v_pages, lengths, table) for this platform."""
    impl = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(platform, "pallas_gpu")
    out = {f"ours ({impl})": jax.jit(functools.partial(paged_attention, impl=impl)),
           "reference (XLA gather)": jax.jit(functools.partial(paged_attention, impl="reference"))}
    if platform == "gpu":
        from jax.experimental.pallas.ops.gpu import paged_attention as jax_gpu

        triton = paged_gpu.BlockSizes(kernel="triton")
        out["ours, Triton kernel"] = jax.jit(
            functools.partial(paged_attention, impl="pallas_gpu", block_sizes=triton))

        out["jax.experimental paged_attention (gpu)"] = jax.jit(
            lambda q, k, v, lens, table: jax_gpu.paged_attention(q, k, v, table, lens))
    elif platform == "tpu":
        from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as jax_tpu

        out["jax.experimental paged_attention (tpu)"] = jax.jit(
            lambda q, k, v, lens, table: jax_tpu(q, k, v, lens, table,
                                                 pages_per_compute_block=8))
    del interpret
    return out


def sweep_configs(kernel: str):
    """BlockSizes to sweep: the Hopper (Mosaic GPU) kernel's tiles, the Triton one's, or both."""
    if kernel in ("hopper", "all"):
        for block_k, stages in ((64, 2), (64, 3), (64, 4), (64, 6), (128, 2), (128, 3)):
            for splits in (None, 4, 8, 16):
                tiles = paged_hopper.HopperPagedBlocks(block_k=block_k, stages=stages,
                                                      num_splits=splits)
                yield paged_gpu.BlockSizes(kernel="hopper", hopper=tiles)
    if kernel in ("triton", "all"):
        for ppb in (4, 8):
            for splits in (None, 4, 8, 16):
                for warps, stages in ((4, 2), (4, 3), (4, 4), (8, 3)):
                    yield paged_gpu.BlockSizes(pages_per_block=ppb, num_splits=splits,
                                               num_warps=warps, num_stages=stages, kernel="triton")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="all", choices=PARTS, help="which benchmark to run")
    p.add_argument("--device", action="store_true", help="full-size shapes on the accelerator")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--context", type=int, default=None)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv_heads", type=int, default=8)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--page_size", type=int, default=16)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--sweep", nargs="?", const="all", default=None, choices=("all", "hopper", "triton"),
                   help="also sweep the GPU kernels' BlockSizes (both, or one kernel's)")
    p.add_argument("--out", default=None, help="append a markdown table to this file")
    engine_flags = p.add_argument_group("engine part")
    engine_flags.add_argument("--config", default=None,
                              help="model config (default: llama3 small on --device, a tiny one on CPU)")
    engine_flags.add_argument("--requests", type=int, default=None)
    engine_flags.add_argument("--prefix_len", type=int, default=None, help="shared prefix tokens")
    engine_flags.add_argument("--suffix_len", type=int, default=None, help="own tokens per request (max)")
    engine_flags.add_argument("--new_tokens", type=int, default=None, help="generated per request")
    engine_flags.add_argument("--slots", type=int, default=None, help="engine batch rows")
    engine_flags.add_argument("--decode_steps", type=int, default=8, help="tokens per decode call")
    engine_flags.add_argument("--repeats", type=int, default=5, help="timed runs (median reported)")
    engine_flags.add_argument("--profile", default=None, help="trace one more run of each setting "
                              "into this directory and print where the GPU time goes")
    args = p.parse_args(argv)

    platform = jax.default_backend()
    if args.device and platform == "cpu":
        raise SystemExit("--device needs a GPU or TPU backend; run without it for the CPU smoke test")
    reports = []
    if args.part in ("kernel", "all"):
        reports.append(kernel_benchmark(args, platform))
    if args.part in ("engine", "all"):
        reports.append(engine_benchmark(args))
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n\n".join(reports) + "\n\n")


def kernel_benchmark(args, platform) -> str:
    batch = args.batch or (8 if args.device else 2)
    context = args.context or (8192 if args.device else 64)
    shape = dict(batch=batch, heads=args.heads if args.device else 8, kv_heads=args.kv_heads if args.device else 2,
                 head_dim=args.head_dim if args.device else 16, context=context,
                 page_size=args.page_size if args.device else 8)
    dtype = jnp.bfloat16 if args.device else jnp.float32
    iters = args.iters if args.device else 5
    q, k_pages, v_pages, lengths, table = make_inputs(dtype=dtype, **shape)
    kv_bytes = 2 * shape["batch"] * shape["kv_heads"] * context * shape["head_dim"] * jnp.dtype(dtype).itemsize

    ref = paged_attention(q, k_pages, v_pages, lengths, table, impl="reference").astype(jnp.float32)
    copy_bw = copy_bandwidth(kv_bytes, iters)
    read_bw = read_bandwidth(kv_bytes, iters)
    rows = []
    for name, fn in peers(platform, interpret=not args.device).items():
        err = float(jnp.abs(fn(q, k_pages, v_pages, lengths, table).astype(jnp.float32) - ref).max())
        t = time_fn(fn, q, k_pages, v_pages, lengths, table, iters=iters)
        rows.append((name, t, kv_bytes / t, err))
    if args.sweep and platform == "gpu":
        for bs in sweep_configs(args.sweep):
            fn = jax.jit(functools.partial(paged_attention, impl="pallas_gpu", block_sizes=bs))
            try:
                err = float(jnp.abs(fn(q, k_pages, v_pages, lengths, table).astype(jnp.float32) - ref).max())
                t = time_fn(fn, q, k_pages, v_pages, lengths, table, iters=iters)
            except Exception as e:  # a config the compiler rejects: report, keep going
                print(f"{bs}: failed: {type(e).__name__}: {str(e)[:120]}")
                continue
            rows.append((f"ours {bs}", t, kv_bytes / t, err))

    device = jax.devices()[0].device_kind
    lines = [f"### paged decode attention on {device} ({platform})", "",
             f"shape: {shape}, dtype {jnp.dtype(dtype).name}; K+V read per call: "
             f"{kv_bytes / 1e6:.1f} MB; device copy bandwidth: {copy_bw / 1e9:.0f} GB/s, "
             f"read bandwidth (a sum): {read_bw / 1e9:.0f} GB/s", "",
             "| implementation | time (us) | GB/s | % of copy bandwidth | % of read bandwidth "
             "| speed vs jax's bundled | max abs err vs reference |",
             "|---|---|---|---|---|---|---|"]
    bundled = next((t for name, t, _, _ in rows if name.startswith("jax.experimental")), None)
    for name, t, bw, err in rows:
        ratio = f"{bundled / t:.2f}x" if bundled else "-"
        lines.append(f"| {name} | {t * 1e6:.1f} | {bw / 1e9:.0f} | {100 * bw / copy_bw:.0f}% | "
                     f"{100 * bw / read_bw:.0f}% | {ratio} | {err:.2e} |")
    if bundled:
        lines += ["", "(jax's bundled kernel does not scale the logits by 1/sqrt(D), hence its error; "
                  "the time is unaffected.)"]
    report = "\n".join(lines)
    print(report)
    if not args.device:
        print("\n(CPU smoke test: interpret mode, timings mean nothing; use --device on GPU/TPU)")
    return report


# ---------------------------------------------------------------------------- engine part


def engine_model(args):
    """A randomly initialised model (throughput does not depend on the weights)."""
    from arch import build_model, count_params
    from configs.base import parse_arg

    spec = args.config or ("configs/llama3.py:small" if args.device else "configs/llama3.py:tiny")
    path, _, arg = spec.partition(":")
    module = __import__(path.removesuffix(".py").replace("/", "."), fromlist=["get_config"])
    parse_arg(arg)  # a bad variant fails here, naming it
    cfg = module.get_config(arg or "tiny").model
    if not args.device and args.config is None:  # smaller still: the CPU run is a smoke test
        cfg.update(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128)
        cfg.max_seq_len = max(cfg.max_seq_len, 4096)  # room for a --prefix_len of a few k
    cfg.scan_layers = False  # the KV cache threads through a list of layers
    total, _ = count_params(cfg)
    return build_model(cfg, 0), cfg, total


def shared_prefix_workload(*, requests, prefix_len, suffix_len, vocab, seed=0):
    """Prompts = one shared prefix + a per-request suffix of 1..suffix_len tokens."""
    rng = np.random.default_rng(seed)
    prefix = rng.integers(0, vocab, prefix_len).tolist()
    return [prefix + rng.integers(0, vocab, int(rng.integers(1, suffix_len + 1))).tolist()
            for _ in range(requests)]


def run_engine(model, prompts, *, new_tokens, profile=None, **engine_kw):
    """(outputs, seconds, stats) of one run of `prompts` on a fresh engine."""
    from serving.engine import Engine

    engine = Engine(model, **engine_kw)
    trace = jax.profiler.trace(profile, create_perfetto_trace=True) if profile else contextlib.nullcontext()
    with trace:
        t0 = time.perf_counter()
        outs = engine.generate(prompts, max_new_tokens=new_tokens)
        seconds = time.perf_counter() - t0
    return outs, seconds, engine.stats


def engine_benchmark(args) -> str:
    model, cfg, params = engine_model(args)
    requests = args.requests or (64 if args.device else 8)
    prefix_len = args.prefix_len or (2048 if args.device else 64)
    suffix_len = args.suffix_len or (32 if args.device else 8)
    new_tokens = args.new_tokens or (64 if args.device else 8)
    slots = args.slots or (16 if args.device else 4)
    page_size = args.page_size if args.device else 8
    max_len = prefix_len + suffix_len + new_tokens
    if max_len > cfg.max_seq_len:
        raise SystemExit(f"prefix_len + suffix_len + new_tokens = {max_len} exceeds "
                         f"model.max_seq_len={cfg.max_seq_len}")
    prompts = shared_prefix_workload(requests=requests, prefix_len=prefix_len,
                                     suffix_len=suffix_len, vocab=cfg.vocab_size)
    prompt_tokens = sum(len(p) for p in prompts)
    rows, outputs = [], {}
    # Radix off; radix on without, then with cascade decode (shared pages read once per
    # chunk of rows instead of once per row).
    settings = [("radix off", False, False, None), ("radix on, no cascade", True, False, None),
                ("radix on", True, True, None)]
    if jax.default_backend() == "gpu":  # same run, the decode kernel forced to Triton
        triton = paged_gpu.BlockSizes(kernel="triton")
        settings += [("radix off, Triton paged kernel", False, False, triton),
                     ("radix on, Triton paged kernel", True, True, triton)]
    for name, radix, cascade, tiles in settings:
        kw = dict(max_slots=slots, max_len=max_len, cache_kind="paged", page_size=page_size,
                  radix=radix, cascade=cascade, new_tokens=new_tokens,
                  decode_steps=args.decode_steps, paged_block_sizes=tiles)
        run_engine(model, prompts, **kw)  # warm-up: compiles every prefill bucket and decode
        # Median of several timed runs. The first timed run of a process used to take
        # 8-10 s on a GPU: a lazily imported Pallas module changed jax's compilation-cache
        # key, so everything compiled again (fixed in pallas_kernels/__init__.py).
        runs = [run_engine(model, prompts, **kw) for _ in range(args.repeats)]
        times = [r[1] for r in runs]
        outs, secs, stats = runs[0][0], statistics.median(times), runs[0][2]
        print(f"{name}: run times in run order (s) {[round(t, 3) for t in times]}")
        if args.profile:  # a third run, traced (the timed one is not)
            from bench.trace_summary import summarise
            logdir = os.path.join(args.profile, name.replace(" ", "_").replace(",", ""))
            run_engine(model, prompts, profile=logdir, **kw)
            print(f"{name}: " + summarise(logdir, top=20))
        outputs[name] = outs
        generated = sum(len(o) for o in outs)
        rows.append((name, secs, generated / secs, stats.prefill_tokens,
                     stats.cached_prompt_tokens / prompt_tokens))
    same = sum(a == b for a, b in zip(outputs["radix off"], outputs["radix on"], strict=True)) / requests
    device = jax.devices()[0].device_kind
    lines = [f"### serving engine, shared-prefix workload, on {device} ({jax.default_backend()})", "",
             f"model: {cfg.family} {params / 1e6:.1f}M parameters ({cfg.dtype}), random weights; "
             f"{requests} requests = {prefix_len}-token shared prefix + 1..{suffix_len} own tokens, "
             f"{new_tokens} new tokens each (greedy); {slots} slots, paged cache, page {page_size}, "
             f"up to {args.decode_steps} tokens per decode call. "
             f"Requests with identical outputs, radix on vs off: {100 * same:.0f}% (bf16 may "
             "flip near-ties of random-weight logits; f32 must give 100%).", "",
             f"Time: median of {args.repeats} runs after a warm-up run.", "",
             "| radix cache | time (s) | generated tokens/s | prefill tokens computed | prompt tokens from cache |",
             "|---|---|---|---|---|"]
    for name, secs, tps, prefilled, hit in rows:
        lines.append(f"| {name} | {secs:.2f} | {tps:,.0f} | {prefilled:,} | {100 * hit:.0f}% |")
    lines.append(f"\nspeed-up from the radix cache: {rows[2][2] / rows[0][2]:.2f}x "
                 f"({rows[1][2] / rows[0][2]:.2f}x without cascade decode)")
    if len(rows) == 5:
        lines.append(f"with the Triton paged kernel: {rows[4][2] / rows[3][2]:.2f}x")
    report = "\n".join(lines)
    print(report)
    if not args.device:
        print("\n(CPU smoke test on a tiny model: use --device on a GPU for real figures)")
    if same < 1 and cfg.dtype == "float32":
        raise SystemExit("radix on and off gave different tokens in float32")
    return report


if __name__ == "__main__":
    main()
