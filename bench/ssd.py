"""Benchmark: the SSD (Mamba-2) Pallas kernel vs the plain-jnp chunked SSD vs flash attention.

    PYTHONPATH=. python bench/ssd.py --out bench/results/ssd.md     # GPU: S = 4k, 16k, 32k
    PYTHONPATH=. python bench/ssd.py --smoke                         # CPU, interpret mode, tiny

At the same batch, heads and sequence length (bf16; Mamba-2's head_dim 64 and d_state
128; attention head_dim 64), times of the forward and of forward+backward:

  ssd kernel     pallas_kernels.ssd.ssd(impl="pallas_gpu" / "pallas_tpu"): the Pallas
                 forward and the kernel backward (ssd/gpu_bwd.py, ssd/tpu_bwd.py).
  ssd jnp        ssd(impl="chunked"): reference.ssd_chunked, XLA (f32 inside).
  flash causal   pallas_kernels.attention(causal=True, impl="auto"): our flash attention.

and the ratios (time of the other / time of the kernel: > 1 means the kernel is faster).
Each time is the median of 5 repetitions of back-to-back calls after warm-up, ended by
`block_until_ready` (bench/flash_attention.py's method). Each row also reports the
largest |kernel - jnp| of the outputs.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys

import jax
import jax.numpy as jnp

import pallas_kernels
from bench.timing import median_time
from pallas_kernels.ssd import ssd


@dataclasses.dataclass(frozen=True)
class Case:
    seq: int
    batch: int = 2
    heads: int = 16
    head_dim: int = 64
    d_state: int = 128
    groups: int = 1
    chunk: int = 256

    @property
    def name(self):
        seq = f"{self.seq // 1024}k" if self.seq % 1024 == 0 else str(self.seq)
        return (f"S={seq} B={self.batch} H={self.heads} P={self.head_dim} "
                f"N={self.d_state} G={self.groups} Q={self.chunk}")


def _inputs(case: Case, dtype=jnp.bfloat16):
    ks = jax.random.split(jax.random.key(0), 8)
    b, t, h, p, g, n = case.batch, case.seq, case.heads, case.head_dim, case.groups, case.d_state
    x = jax.random.normal(ks[0], (b, t, h, p), dtype)
    dt = jax.nn.softplus(jax.random.normal(ks[1], (b, t, h), jnp.float32) - 3.0)
    A = -jnp.exp(jax.random.uniform(ks[2], (h,), jnp.float32, 0.0, 2.5))
    B = jax.random.normal(ks[3], (b, t, g, n), dtype)
    C = jax.random.normal(ks[4], (b, t, g, n), dtype)
    D = jnp.ones((h,), jnp.float32)
    dy = jax.random.normal(ks[5], (b, t, h, p), dtype)
    qkv = jax.random.normal(ks[6], (3, b, t, h, p), dtype)
    return (x, dt, A, B, C, D), dy, qkv


PARTS = ("fwd", "fwd_bwd")


def _measure(fn, args, cotangent, parts=PARTS):
    """(fwd seconds, fwd+bwd seconds), or an error string for each ("not run" outside parts)."""
    fwd = jax.jit(fn)

    @jax.jit
    def fwd_bwd(args, cotangent):
        y, vjp = jax.vjp(fn, *args)
        return y, vjp(cotangent)

    out = []
    for part, f, a in (("fwd", fwd, args), ("fwd_bwd", fwd_bwd, (args, cotangent))):
        if part not in parts:
            out.append("not run")
            continue
        try:
            out.append(median_time(f, *a))
        except Exception as e:  # noqa: BLE001 - report OOM / unsupported and go on
            out.append(f"{type(e).__name__}: {str(e).splitlines()[0][:80]}")
    return out


def _kernel_impl():
    return {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(jax.default_backend(), "pallas_gpu")


IMPLS = ("ssd_kernel", "ssd_jnp", "flash_causal")


def run_case(case: Case, kernel_impl: str, parts=PARTS, names=IMPLS):
    args, dy, qkv = _inputs(case)
    ssd_fn = lambda impl: lambda x, dt, A, B, C, D: ssd(  # noqa: E731
        x, dt, A, B, C, D=D, chunk_size=case.chunk, impl=impl)
    impls = {
        "ssd_kernel": (ssd_fn(kernel_impl), args, dy),
        "ssd_jnp": (ssd_fn("chunked"), args, dy),
        "flash_causal": (functools.partial(pallas_kernels.attention, causal=True),
                         tuple(qkv), dy),
    }
    row = {"case": case.name}
    for name, (fn, a, ct) in impls.items():
        if name not in names:
            row[name] = {"fwd_s": "not run", "fwd_bwd_s": "not run"}
            continue
        # progress on stderr: on an H200 a call once printed no row within 90 s, and which
        # impl it was in stayed unknown
        print(f"{case.name}: {name}", file=sys.stderr, flush=True)
        t_f, t_fb = _measure(fn, a, ct, parts)
        row[name] = {"fwd_s": t_f, "fwd_bwd_s": t_fb}
    try:
        if not {"ssd_kernel", "ssd_jnp"} <= set(names):
            raise NotImplementedError("not compared")
        got = jax.jit(ssd_fn(kernel_impl))(*args).astype(jnp.float32)
        want = jax.jit(ssd_fn("chunked"))(*args).astype(jnp.float32)
        row["max_abs_diff_kernel_vs_jnp"] = float(jnp.max(jnp.abs(got - want)))
    except Exception as e:  # noqa: BLE001
        row["max_abs_diff_kernel_vs_jnp"] = type(e).__name__
    print(json.dumps(row), flush=True)
    return row


def _ms(x):
    return f"{1e3 * x:.2f}" if isinstance(x, float) else "—"


def _ratio(row, other, key):
    a, b = row[other][key], row["ssd_kernel"][key]
    return f"{a / b:.2f}×" if isinstance(a, float) and isinstance(b, float) else "—"


def table(rows) -> str:
    heads = ["case"]
    for key in ("fwd", "fwd+bwd"):
        heads += [f"ssd kernel {key} ms", f"ssd jnp {key} ms", f"flash causal {key} ms"]
    heads += ["jnp/kernel fwd", "jnp/kernel f+b", "flash/kernel fwd", "flash/kernel f+b",
              "max |kernel - jnp|"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        cells = [r["case"]]
        for key in ("fwd_s", "fwd_bwd_s"):
            cells += [_ms(r[n][key]) for n in ("ssd_kernel", "ssd_jnp", "flash_causal")]
        cells += [_ratio(r, "ssd_jnp", "fwd_s"), _ratio(r, "ssd_jnp", "fwd_bwd_s"),
                  _ratio(r, "flash_causal", "fwd_s"), _ratio(r, "flash_causal", "fwd_bwd_s")]
        d = r["max_abs_diff_kernel_vs_jnp"]
        cells.append(f"{d:.3g}" if isinstance(d, float) else str(d))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, runs anywhere (interpret mode off the kernel's device)")
    parser.add_argument("--seqs", default="4096,16384,32768", help="sequence lengths")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma list of {PARTS}: what to time (on an H200 the compile of "
                             "fwd_bwd at 4k did not finish within 50 s)")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {IMPLS}")
    parser.add_argument("--out", default=None, help="write a markdown table here")
    args = parser.parse_args(argv)
    device = jax.devices()[0].device_kind
    print(f"jax {jax.__version__}, device: {device}", flush=True)
    kernel_impl = _kernel_impl()
    if args.smoke:
        cases = [Case(256, batch=1, heads=2, head_dim=16, d_state=16, chunk=64)]
    else:
        cases = [Case(int(s), batch=args.batch, heads=args.heads, chunk=args.chunk)
                 for s in args.seqs.split(",")]
    parts = tuple(p.strip() for p in args.parts.split(","))
    if any(p not in PARTS for p in parts):
        raise ValueError(f"--parts={args.parts!r} must be a comma list of {PARTS}")
    names = tuple(n.strip() for n in args.impls.split(","))
    if any(n not in IMPLS for n in names):
        raise ValueError(f"--impls={args.impls!r} must be a comma list of {IMPLS}")
    rows = [run_case(c, kernel_impl, parts, names) for c in cases]
    md = table(rows)
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# SSD (Mamba-2) kernel vs plain jnp vs flash attention\n\n"
                    f"- Device: {device}; jax {jax.__version__}; kernel impl {kernel_impl!r}.\n"
                    f"- Command: `PYTHONPATH=. python bench/ssd.py --out {args.out}`\n"
                    "- bf16 inputs; times in ms (median of 5); ratios = other / kernel "
                    "(> 1: the kernel is faster). The kernel's backward is ssd/gpu_bwd.py "
                    "(GPU) or ssd/tpu_bwd.py (TPU).\n\n" + md + "\n")


if __name__ == "__main__":
    main()
