"""Where the device time of a jax.profiler trace goes: GPU kernels grouped by kind.

    with jax.profiler.trace(logdir, create_perfetto_trace=True):
        for _ in range(3):
            step()
    python bench/trace_summary.py logdir --steps 3

Reads the newest `perfetto_trace.json.gz` under `logdir` and sums the durations of the
kernels that ran on a GPU stream, per step: the kinds (matmul, attention, fusion, ...)
are guessed from kernel names (cuBLAS/CUTLASS gemms, our Pallas kernels by their
names, XLA fusions), then the top kernels by time. Overlapping streams are summed
separately, so the total may exceed wall time.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os

KINDS = (  # (kind, substrings of a lowercase kernel name), first match wins
    ("attention", ("flash", "attention", "mha", "fmha", "cudnn", "paged")),
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "sm90_", "sm80_", "cublas", "matmul", "dot")),
    ("collective", ("nccl", "all_reduce", "all-gather", "allgather", "reduce_scatter")),
    ("copy/transpose", ("copy", "transpose", "memcpy", "memset")),
    ("fusion/elementwise", ("fusion", "loop_", "input_", "reduce", "convert", "add", "multiply")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def load_kernels(logdir: str) -> collections.Counter:
    """{kernel name: total microseconds} over the GPU streams of the newest trace."""
    paths = sorted(glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True)
                   + glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not paths:
        raise ValueError(f"no perfetto trace under {logdir=}: profile with create_perfetto_trace=True")
    with gzip.open(paths[-1], "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    gpu_pids = {e["pid"] for e in events
                if e.get("ph") == "M" and e.get("name") == "process_name"
                and "gpu" in str(e.get("args", {}).get("name", "")).lower()}
    totals = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu_pids:
            totals[e["name"]] += float(e.get("dur", 0.0))
    return totals


def summarise(logdir: str, steps: int = 1, top: int = 25) -> str:
    totals = load_kernels(logdir)
    if not totals:
        return f"no GPU kernel events in the trace under {logdir} (was it taken on a GPU?)"
    by_kind = collections.Counter()
    for name, us in totals.items():
        by_kind[kind_of(name)] += us
    all_us = sum(totals.values())
    lines = [f"GPU kernel time per step: {all_us / steps / 1e3:.1f} ms ({len(totals)} kernels)", "",
             "| kind | ms per step | share |", "|---|---|---|"]
    for kind, us in by_kind.most_common():
        lines.append(f"| {kind} | {us / steps / 1e3:.1f} | {100 * us / all_us:.0f}% |")
    lines += ["", "| kernel | kind | ms per step |", "|---|---|---|"]
    for name, us in totals.most_common(top):
        lines.append(f"| {name[:90]} | {kind_of(name)} | {us / steps / 1e3:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("logdir")
    p.add_argument("--steps", type=int, default=1, help="steps the trace holds (to report per step)")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    print(summarise(args.logdir, args.steps, args.top))


if __name__ == "__main__":
    main()
