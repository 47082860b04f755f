"""Benchmark: our Pallas grouped matmul (gmm) vs jax.lax.ragged_dot vs a dense matmul.

    PYTHONPATH=. python bench/grouped_matmul.py --out bench/results/grouped_matmul.md   # GPU
    PYTHONPATH=. python bench/grouped_matmul.py --cases "64 experts" --dists balanced
    PYTHONPATH=. python bench/grouped_matmul.py --sweep --cases Mixtral   # tune gpu.Tiles
    PYTHONPATH=. python bench/grouped_matmul.py --smoke        # tiny shapes: checks the script on CPU

The MoE expert matmul: lhs [M, K] rows sorted by expert, rhs [G, K, N] expert weights,
group_sizes [G] summing to M. Shapes (M rows, K, N, G experts), bf16:
  64 experts     65536 x 2048 -> 1408, 64    (DeepSeek-V2-Lite / Moonlight expert width)
  8 experts      65536 x 2048 -> 1408, 8
  DeepSeek-V3    131072 x 7168 -> 2048, 32   (DeepSeek-V3 width, 32 local experts)
  Mixtral        65536 x 4096 -> 14336, 8
  Qwen3-30B-A3B  65536 x 2048 -> 768, 128
each with balanced group sizes (M / G each) and Zipf-skewed ones (size of the rank-r
expert ∝ 1 / r, in a fixed shuffled order). Columns: TFLOP/s of "ours"
(`pallas_kernels.grouped_matmul.gmm`, impl pallas_gpu), `jax.lax.ragged_dot`, tokamax's
`ragged_dot` when `import tokamax` works, and a dense [M, K] @ [K, N] matmul of the same
FLOPs (the roof a grouped matmul aims at); forward, and forward+backward (the vjp to lhs
and rhs: dlhs = dout @ rhsᵀ per group, drhs = lhsᵀ @ dout per group), counted as 2·M·K·N
and 3× that. Each time is the median of several repetitions of back-to-back calls
after warm-up, ended by `block_until_ready` (bench/flash_attention.py's method). A row
that fails (an out-of-memory ragged_dot at DeepSeek width, an unsupported backend) shows
its error in place of the number.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bench.timing import median_time
from pallas_kernels.grouped_matmul import api, gpu


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    m: int
    k: int
    n: int
    groups: int

    def flops_fwd(self) -> float:
        return 2.0 * self.m * self.k * self.n


CASES = (
    Case("64 experts", 65536, 2048, 1408, 64),
    Case("8 experts", 65536, 2048, 1408, 8),
    Case("DeepSeek-V3", 131072, 7168, 2048, 32),
    Case("Mixtral", 65536, 4096, 14336, 8),
    Case("Qwen3-30B-A3B", 65536, 2048, 768, 128),
)
SMOKE_CASES = (Case("smoke 4 experts", 256, 128, 128, 4), Case("smoke 8 experts", 192, 64, 96, 8))
DISTS = ("balanced", "zipf")


def group_sizes(m: int, groups: int, dist: str, seed: int = 0) -> np.ndarray:
    """[G] int32 summing to m: equal shares, or Zipf (rank r ∝ 1/r) in a shuffled order."""
    if dist == "balanced":
        share = np.full(groups, 1.0)
    elif dist == "zipf":
        share = 1.0 / np.arange(1, groups + 1)
        share = np.random.default_rng(seed).permutation(share)
    else:
        raise ValueError(f"dist={dist!r} must be one of {DISTS}")
    sizes = np.floor(share / share.sum() * m).astype(np.int64)
    sizes[np.argmax(share)] += m - sizes.sum()  # the rounding remainder to the largest
    return sizes.astype(np.int32)


def _inputs(case: Case, seed: int = 0):
    ks = jax.random.split(jax.random.key(seed), 3)
    lhs = jax.random.normal(ks[0], (case.m, case.k), jnp.bfloat16)
    rhs = (jax.random.normal(ks[1], (case.groups, case.k, case.n), jnp.bfloat16)
           * case.k**-0.5).astype(jnp.bfloat16)
    dout = jax.random.normal(ks[2], (case.m, case.n), jnp.bfloat16)
    return lhs, rhs, dout


# ----------------------------------------------------------------------------- impls
def _ours(tiles=None, interpret=None):
    return functools.partial(api.gmm, impl="pallas_gpu", tiles=tiles, interpret=interpret)


def _tokamax():
    try:
        import tokamax
    except ImportError:
        return None
    return lambda lhs, rhs, gs: tokamax.ragged_dot(lhs, rhs, gs)


def _dense(lhs, w, gs):
    """[M, K] @ [K, N]: the same FLOPs as the grouped matmul with one weight matrix
    (run_cases passes it rhs[0])."""
    del gs
    return lhs @ w


IMPLS = ("ours", "ragged_dot", "tokamax", "dense")


def impls(names=IMPLS):
    """The impls to time, of `names` (tokamax only where it imports)."""
    table = {"ours": _ours(), "ragged_dot": jax.lax.ragged_dot, "tokamax": _tokamax(),
             "dense": _dense}
    return {n: table[n] for n in names if table[n] is not None}


# ----------------------------------------------------------------------------- timing
def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"


def measure(fn, lhs, rhs, gs, dout, *, reps=5):
    """(fwd seconds, fwd+bwd seconds), each a float or an error string."""
    fwd = jax.jit(fn)

    @jax.jit
    def fwd_bwd(lhs, rhs, gs, dout):
        y, vjp = jax.vjp(lambda a, b: fn(a, b, gs), lhs, rhs)
        return y, vjp(dout)

    out = []
    for f, args in ((fwd, (lhs, rhs, gs)), (fwd_bwd, (lhs, rhs, gs, dout))):
        try:
            out.append(median_time(f, *args, reps=reps))
        except Exception as e:  # noqa: BLE001 - report OOM / unsupported and go on
            out.append(_error(e))
    return out


def _tflops(flops, secs):
    return flops / secs / 1e12 if isinstance(secs, float) else None


def run_cases(cases, dists, *, reps=5, names=IMPLS, skip_ragged_dot=()):
    rows = []
    for case in cases:
        lhs, rhs, dout = _inputs(case)
        for dist in dists:
            sizes = group_sizes(case.m, case.groups, dist)
            gs = jnp.asarray(sizes)
            row = {"case": case.name, "dist": dist, "M": case.m, "K": case.k, "N": case.n,
                   "G": case.groups, "largest_group": int(sizes.max())}
            for name, fn in impls(names).items():
                if name == "ragged_dot" and case.name in skip_ragged_dot:
                    continue
                weights = rhs[0] if name == "dense" else rhs
                t_f, t_fb = measure(fn, lhs, weights, gs, dout, reps=reps)
                row[name] = {"fwd_s": t_f, "fwd_bwd_s": t_fb,
                             "fwd_tflops": _tflops(case.flops_fwd(), t_f),
                             "fwd_bwd_tflops": _tflops(3 * case.flops_fwd(), t_fb)}
            try:  # sanity: ours against ragged_dot (bf16 outputs, f32 accumulation in both)
                if "ragged_dot" not in row:
                    raise NotImplementedError("ragged_dot not run")
                a = jax.jit(_ours())(lhs, rhs, gs).astype(jnp.float32)
                b = jax.jit(jax.lax.ragged_dot)(lhs, rhs, gs).astype(jnp.float32)
                row["max_abs_diff_vs_ragged_dot"] = float(jnp.max(jnp.abs(a - b)))
            except Exception as e:  # noqa: BLE001 - ragged_dot may not fit
                row["max_abs_diff_vs_ragged_dot"] = _error(e)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


# ----------------------------------------------------------------------------- tables
def _fmt(x):
    if not isinstance(x, float):
        return "—"
    return f"{x:.0f}" if x >= 10 else f"{x:.2g}"


def _ratio(row, a, b, key):
    x, y = row.get(a, {}).get(key), row.get(b, {}).get(key)
    return f"{x / y:.2f}×" if x and y else "—"


def table(rows) -> str:
    names = [n for n in ("ours", "ragged_dot", "tokamax", "dense") if any(n in r for r in rows)]
    heads = [f"{n} {k}" for k in ("fwd", "fwd+bwd") for n in names]
    ratios = [("ours", "ragged_dot"), ("ours", "dense")] + (
        [("ours", "tokamax")] if "tokamax" in names else [])
    heads += [f"{a}/{b} {k}" for a, b in ratios for k in ("fwd", "f+b")]
    lines = ["| case | groups | largest | " + " | ".join(heads) + " |",
             "|" + "---|" * (len(heads) + 3)]
    for r in rows:
        cells = [f"{r['case']} ({r['M']}×{r['K']}→{r['N']})", f"{r['G']} {r['dist']}",
                 str(r["largest_group"])]
        for key in ("fwd_tflops", "fwd_bwd_tflops"):
            cells += [_fmt(r.get(n, {}).get(key)) for n in names]
        for a, b in ratios:
            cells += [_ratio(r, a, b, "fwd_tflops"), _ratio(r, a, b, "fwd_bwd_tflops")]
        lines.append("| " + " | ".join(cells) + " |")
    errors = [f"- {r['case']} {r['dist']}, {n} {k}: {r[n][s]}" for r in rows for n in names
              for k, s in (("fwd", "fwd_s"), ("fwd+bwd", "fwd_bwd_s"))
              if isinstance(r.get(n, {}).get(s), str)]
    if errors:
        lines += ["", "Errors:"] + errors
    return "\n".join(lines)


def _variants():
    """gpu.Tiles to try: (block_m, block_k, block_n), warps, stages, L2 band (group_m)."""
    base = gpu.Tiles()
    rep = functools.partial(dataclasses.replace, base)
    return {
        "defaults": None,  # per kernel: gpu.GMM_TILES for gmm, gpu.TGMM_TILES for tgmm
        "Tiles()": base,
        "w8 s3": rep(num_warps=8, num_stages=3),
        "128x128x128 w8 s3": rep(block_k=128, num_warps=8, num_stages=3),
        "64x64x128 w4 s4": rep(block_m=64),
        "128x64x128 w8 s4": rep(num_warps=8, num_stages=4),  # GMM_TILES with 128 rows
        "128x64x256 w8 s3": rep(block_n=256, num_warps=8, num_stages=3),
        "128x64x256 w8 s4": rep(block_n=256, num_warps=8, num_stages=4),
        "256x64x128 w8 s4": rep(block_m=256, num_warps=8, num_stages=4),
        "256x64x128 w8 s3": rep(block_m=256, num_warps=8, num_stages=3),
        "128x32x128 w4 s5": rep(block_k=32, num_stages=5),
        "group_m 1": rep(group_m=1),
        "group_m 16": rep(group_m=16),
    }


def sweep(cases, dists, reps):
    """Our kernel's TFLOP/s under each of `_variants()` (fwd: the gmm; f+b: gmm + its vjp,
    where the same tiles serve the transposed gmm and the tgmm)."""
    for case in cases:
        lhs, rhs, dout = _inputs(case)
        for dist in dists:
            gs = jnp.asarray(group_sizes(case.m, case.groups, dist))
            for name, tiles in _variants().items():
                t_f, t_fb = measure(_ours(tiles), lhs, rhs, gs, dout, reps=reps)
                print(f"{case.name} {dist} {name:20s} fwd {_fmt(_tflops(case.flops_fwd(), t_f))} "
                      f"TF/s  fwd+bwd {_fmt(_tflops(3 * case.flops_fwd(), t_fb))} TF/s  {tiles}",
                      flush=True)
                for part, t in (("fwd", t_f), ("fwd+bwd", t_fb)):
                    if isinstance(t, str):  # the error in place of a time: say which
                        print(f"  {part}: {t[:200]}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script on CPU "
                   "(the kernel in interpret mode)")
    p.add_argument("--sweep", action="store_true", help="our kernel under several gpu.Tiles")
    p.add_argument("--cases", default=None, help="comma list of case names (default: all)")
    p.add_argument("--dists", default=",".join(DISTS), help=f"comma list of {DISTS}")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (median reported)")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {IMPLS}")
    p.add_argument("--skip_ragged_dot", default="",
                   help="comma list of case names where ragged_dot is not run (at DeepSeek-V3 "
                        "width its forward+backward autotuning ran out of an H200's memory)")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    if jax.default_backend() == "cpu" and not args.smoke:
        sys.exit("bench/grouped_matmul.py measures GPU kernels; on CPU use --smoke")
    cases = SMOKE_CASES if args.smoke else CASES
    if args.cases:
        wanted = [c.strip() for c in args.cases.split(",")]
        unknown = [w for w in wanted if w not in {c.name for c in cases}]
        if unknown:
            raise ValueError(f"--cases {unknown} must be among {[c.name for c in cases]}")
        cases = [c for c in cases if c.name in wanted]
    dists = args.dists.split(",")
    if any(d not in DISTS for d in dists):
        raise ValueError(f"--dists={args.dists!r} must be a comma list of {DISTS}")
    device = jax.devices()[0].device_kind
    print(f"jax {jax.__version__}, device: {device}, tiles: gmm {gpu.GMM_TILES}, "
          f"tgmm {gpu.TGMM_TILES}", flush=True)
    reps = 1 if args.smoke else args.reps
    if args.sweep:
        sweep(cases, dists, reps)
        return
    names = [n.strip() for n in args.impls.split(",")]
    if any(n not in IMPLS for n in names) or "ours" not in names:
        raise ValueError(f"--impls={args.impls!r} must be a comma list of {IMPLS} with 'ours'")
    rows = run_cases(cases, dists, reps=reps, names=names,
                     skip_ragged_dot=set(filter(None, args.skip_ragged_dot.split(","))))
    text = table(rows)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"jax": jax.__version__, "device": device, "rows": rows}, f, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# Grouped matmul (bench/grouped_matmul.py)\n\n- Device: {device}; jax "
                    f"{jax.__version__}; bf16; default tiles: gmm {gpu.GMM_TILES}, tgmm {gpu.TGMM_TILES}.\n\n" + text + "\n")


if __name__ == "__main__":
    sys.exit(main())
