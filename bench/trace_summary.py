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
    return _kernel_totals(load_gpu_events(logdir))


def load_gpu_events(logdir: str) -> list[dict]:
    """The complete ("X") events of the GPU streams of the newest trace under `logdir`."""
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
    return [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids]


def _kernel_totals(events) -> collections.Counter:
    totals = collections.Counter()
    for e in events:
        totals[e["name"]] += float(e.get("dur", 0.0))
    return totals


def idle_gaps(events, long_us: float = 100.0) -> dict:
    """Where the GPU did nothing between its first and last kernel.

    Returns microseconds: "span" (first start to last end), "busy" (the union of kernel
    intervals over all streams), and the idle rest split into gaps shorter than
    `long_us` ("short": launch latency between back-to-back kernels) and longer ones
    ("long": the device waited on the host), with "long_count" gaps of the latter.
    """
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)))
                   for e in events if "ts" in e)
    out = dict(span=0.0, busy=0.0, short=0.0, long=0.0, long_count=0)
    if not spans:
        return out
    out["span"] = max(end for _, end in spans) - spans[0][0]
    cur_start, cur_end = spans[0]
    for start, end in spans[1:]:
        if start > cur_end:  # a gap: the union so far ends at cur_end
            gap = start - cur_end
            key = "long" if gap >= long_us else "short"
            out[key] += gap
            out["long_count"] += key == "long"
            out["busy"] += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    out["busy"] += cur_end - cur_start
    return out


def summarise(logdir: str, steps: int = 1, top: int = 25) -> str:
    events = load_gpu_events(logdir)
    totals = _kernel_totals(events)
    if not totals:
        return f"no GPU kernel events in the trace under {logdir} (was it taken on a GPU?)"
    gaps = idle_gaps(events)
    by_kind = collections.Counter()
    for name, us in totals.items():
        by_kind[kind_of(name)] += us
    all_us = sum(totals.values())
    lines = [f"GPU kernel time per step: {all_us / steps / 1e3:.1f} ms ({len(totals)} kernels)",
             f"GPU timeline: busy {gaps['busy'] / 1e3:.1f} ms of a {gaps['span'] / 1e3:.1f} ms span; "
             f"idle {gaps['short'] / 1e3:.1f} ms in gaps < 100 us (launches), "
             f"{gaps['long'] / 1e3:.1f} ms in {gaps['long_count']} gaps >= 100 us (waiting on the host)", "",
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
