"""Benchmark: our Pallas GPU flash attention vs cuDNN, jax's bundled Pallas kernel and XLA.

    PYTHONPATH=. python bench/flash_attention.py              # full table (H100: ~3 min)
    PYTHONPATH=. python bench/flash_attention.py --quick      # S=8192 causal only
    PYTHONPATH=. python bench/flash_attention.py --sweep --head-dim 256   # tune Triton blocks
    PYTHONPATH=. python bench/flash_attention.py --sweep-hopper   # tune the Mosaic GPU tiles
    PYTHONPATH=. python bench/flash_attention.py --segments 4  # packed documents vs none

Reports TFLOP/s of the forward and of forward+backward (bf16, BTHD), and the ratios of
ours to each peer. "ours" is what `gpu.flash_attention` picks by default (on Hopper the
Mosaic GPU kernels of gpu_hopper*.py where they apply); "ours (Triton)" forces the Triton
kernels; "jax Mosaic FA3" is jax's bundled Mosaic GPU example (f16, non-causal backward).
FLOPs: 4·B·H·S²·D for the forward (two matmuls), half of it when causal (a sliding
window W counts the kept pairs, about S·W), and 3.5× the forward for forward+backward
(the backward's five matmuls), as FlashAttention-2 counts them.

Packed documents ("4 docs": segment ids of 4 documents of random lengths per row, the same
ids in every run; train.py's loader always sends segment ids) count the kept pairs too
(each document's own causal or full square), so their TFLOP/s and the same shape's row
without segments compare the kernels' efficiency per useful FLOP; `--segments N` runs those
pairs of rows alone and prints both ratios (TFLOP/s and wall time); `--segments 1` (one
document filling each row) measures what the segment-id path costs where no tile is masked
by it. cuDNN, XLA (both
through jax.nn.dot_product_attention) and jax's Mosaic FA3 have no segment ids: their cells
say so; jax's bundled Pallas (Triton) kernel takes them.
Each time is the median of several repetitions of back-to-back calls after warm-up,
ended by `block_until_ready`.
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
from pallas_kernels.flash_attention import gpu, gpu_hopper, gpu_hopper_bwd


@dataclasses.dataclass(frozen=True)
class Case:
    seq: int
    causal: bool
    batch: int = 4
    heads: int = 16
    kv_heads: int = 16
    head_dim: int = 128
    window: int | None = None
    docs: int | None = None  # packed documents per row (segment ids), None: no segment ids

    @property
    def name(self):
        s = f"S={self.seq // 1024}k {'causal' if self.causal else 'full'} D={self.head_dim}"
        if self.kv_heads != self.heads:
            s += f" GQA {self.heads // self.kv_heads}:1"
        if self.window:
            s += f" window={self.window // 1024}k"
        if self.docs:
            s += f" {self.docs} docs"
        return s

    def segment_ids(self):
        """[batch, seq] int32 ids 1..docs of `docs` documents of random lengths (fixed seed)."""
        if not self.docs:
            return None
        rng = np.random.default_rng(self.seq + self.docs)
        rows = [np.searchsorted(np.sort(rng.choice(np.arange(1, self.seq), self.docs - 1,
                                                   replace=False)),
                                np.arange(self.seq), side="right") + 1
                for _ in range(self.batch)]
        return np.stack(rows).astype(np.int32)

    def flops_fwd(self):
        if self.window is not None:  # kept pairs of a causal window: about S*W - W^2/2
            pairs = self.seq * self.window - self.window**2 / 2
        elif self.docs:  # each document's own square (causal: its lower triangle)
            lengths = [np.bincount(row)[1:] for row in self.segment_ids()]
            pairs = np.mean([np.sum(n * (n + 1) / 2 if self.causal else n * n) for n in lengths])
        else:
            pairs = self.seq**2 / (2 if self.causal else 1)
        return 4 * self.batch * self.heads * pairs * self.head_dim


def _inputs(case: Case):
    ks = jax.random.split(jax.random.key(0), 4)
    shape_q = (case.batch, case.seq, case.heads, case.head_dim)
    shape_kv = (case.batch, case.seq, case.kv_heads, case.head_dim)
    q = jax.random.normal(ks[0], shape_q, jnp.bfloat16)
    k = jax.random.normal(ks[1], shape_kv, jnp.bfloat16)
    v = jax.random.normal(ks[2], shape_kv, jnp.bfloat16)
    do = jax.random.normal(ks[3], shape_q, jnp.bfloat16)
    return q, k, v, do


def _ours(case: Case, block_sizes=None):
    seg = case.segment_ids()
    return functools.partial(gpu.flash_attention, causal=case.causal,
                             sliding_window=case.window, block_sizes=block_sizes,
                             segment_ids=None if seg is None else jnp.asarray(seg))


def _ours_triton(case: Case):
    """Our Triton kernels only (what "ours" is off Hopper, and was before the Mosaic GPU ones)."""
    return _ours(case, dataclasses.replace(gpu.BlockSizes.get_default(case.head_dim),
                                           forward="triton", backward="split"))


def _jax_mosaic(case: Case):
    """jax's bundled FlashAttention-3 example in Mosaic GPU (attention_mgpu.attention).

    It has no softmax scale (q is pre-scaled here), no window, no segment ids, f16 shared
    memory (so it gets f16 inputs: `run_cases` casts them outside the timed call), and its
    backward does not take causal masks.
    """
    if case.window is not None:
        return None
    if case.docs:
        return "no segment ids in attention_mgpu"
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    config = attention_mgpu.TuningConfig(
        block_q=64, block_kv=gpu_hopper.HopperBlocks.get_default(case.head_dim).block_kv,
        max_concurrent_steps=2, causal=case.causal,
        block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)

    def fn(q, k, v):
        return attention_mgpu.attention(q * jnp.asarray(case.head_dim**-0.5, q.dtype), k, v,
                                        config=config)
    return fn


def _dpa(case: Case, implementation: str):
    """jax.nn.dot_product_attention, or why not: it has no segment ids (a peer that cannot
    take a case returns the reason, shown instead of a number)."""
    if case.docs:
        return "no segment ids in jax.nn.dot_product_attention"
    window = None if case.window is None else (case.window - 1, 0)
    return functools.partial(jax.nn.dot_product_attention, is_causal=case.causal,
                             local_window_size=window, implementation=implementation)


def _jax_pallas(case: Case):
    if case.window is not None:
        return None  # no sliding window in jax's bundled kernel
    from jax.experimental.pallas.ops.gpu import attention as jax_attention

    group = case.heads // case.kv_heads
    seg = case.segment_ids()
    seg = None if seg is None else jnp.asarray(seg)

    def fn(q, k, v):
        if group > 1:  # no GQA there: K/V repeated in memory
            k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        return jax_attention.mha(q, k, v, seg, sm_scale=case.head_dim**-0.5,
                                 causal=case.causal)
    return fn


def measure(case: Case, attn, q, k, v, do):
    """(fwd seconds, fwd+bwd seconds) or an error string for each."""
    fwd = jax.jit(attn)

    @jax.jit
    def fwd_bwd(q, k, v, do):
        o, vjp = jax.vjp(attn, q, k, v)
        return o, vjp(do)

    out = []
    for fn, args in ((fwd, (q, k, v)), (fwd_bwd, (q, k, v, do))):
        try:
            out.append(median_time(fn, *args))
        except Exception as e:  # noqa: BLE001 - report OOM / unsupported and go on
            out.append(f"{type(e).__name__}: {str(e).splitlines()[0][:80]}")
    return out


def _tflops(case, secs, mult=1.0):
    return case.flops_fwd() * mult / secs / 1e12 if isinstance(secs, float) else None


def run_cases(cases, peers=("ours_triton", "cudnn", "jax_mosaic", "jax_pallas", "xla"),
              block_sizes=None):
    rows = []
    for case in cases:
        q, k, v, do = _inputs(case)
        impls = {"ours": _ours(case, block_sizes)}
        if "ours_triton" in peers:
            impls["ours_triton"] = _ours_triton(case)
        if "cudnn" in peers:
            impls["cudnn"] = _dpa(case, "cudnn")
        if "jax_mosaic" in peers:
            impls["jax_mosaic"] = _jax_mosaic(case)
        if "jax_pallas" in peers:
            impls["jax_pallas"] = _jax_pallas(case)
        if "xla" in peers and case.seq <= 4096:  # XLA materialises [B,H,S,S] logits
            impls["xla"] = _dpa(case, "xla")
        row = {"case": case.name}
        for name, attn in impls.items():
            if attn is None:
                continue
            if isinstance(attn, str):  # a peer that cannot take this case: say why
                row[name] = {"note": attn}
                continue
            args = (q, k, v, do)
            if name == "jax_mosaic":  # f16 only (see _jax_mosaic)
                args = tuple(x.astype(jnp.float16) for x in args)
            t_f, t_fb = measure(case, attn, *args)
            row[name] = {"fwd_s": t_f, "fwd_bwd_s": t_fb,
                         "fwd_tflops": _tflops(case, t_f), "fwd_bwd_tflops": _tflops(case, t_fb, 3.5)}
        # Sanity: same outputs as cuDNN (or, where it cannot run, as our Triton kernels).
        peer = "cudnn" if callable(impls.get("cudnn")) else "ours_triton"
        if callable(impls.get(peer)):
            try:
                diff = jnp.max(jnp.abs(jax.jit(impls["ours"])(q, k, v).astype(jnp.float32)
                                       - jax.jit(impls[peer])(q, k, v).astype(jnp.float32)))
                row[f"max_abs_diff_vs_{peer}"] = float(diff)
            except Exception as e:  # noqa: BLE001
                row[f"max_abs_diff_vs_{peer}"] = f"{type(e).__name__}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _fmt(x):
    return f"{x:.0f}" if isinstance(x, float) else "—"


def _cell(result: dict, key: str):
    return "n/a" if "note" in result else _fmt(result.get(key))


def _ratio(row, a, b, key):
    x, y = row.get(a, {}).get(key), row.get(b, {}).get(key)
    return f"{x / y:.2f}×" if x and y else "—"


TABLE_IMPLS = ("ours", "ours_triton", "cudnn", "jax_mosaic", "jax_pallas", "xla")
TABLE_NAMES = ("ours", "ours (Triton)", "cuDNN", "jax Mosaic FA3", "jax Pallas", "XLA")


def table(rows):
    heads = [f"{n} {k}" for k in ("fwd", "fwd+bwd") for n in TABLE_NAMES]
    heads += ["ours/cuDNN fwd", "ours/cuDNN f+b", "ours/jax-Mosaic fwd", "ours/jax-Pallas f+b"]
    lines = ["| case | " + " | ".join(heads) + " |", "|" + "---|" * (len(heads) + 1)]
    for r in rows:
        cells = [r["case"]]
        for key in ("fwd_tflops", "fwd_bwd_tflops"):
            cells += [_cell(r.get(n, {}), key) for n in TABLE_IMPLS]
        cells += [_ratio(r, "ours", "cudnn", "fwd_tflops"), _ratio(r, "ours", "cudnn", "fwd_bwd_tflops"),
                  _ratio(r, "ours", "jax_mosaic", "fwd_tflops"),
                  _ratio(r, "ours", "jax_pallas", "fwd_bwd_tflops")]
        lines.append("| " + " | ".join(cells) + " |")
    notes = sorted({f"{title}: {r[n]['note']}" for r in rows
                    for n, title in zip(TABLE_IMPLS, TABLE_NAMES, strict=True)
                    if "note" in r.get(n, {})})
    if notes:
        lines += ["", "n/a: " + "; ".join(notes)]
    return "\n".join(lines)


def segment_cost(rows):
    """Per packed-documents row: ours with segment ids against the same shape without.

    TFLOP/s count each row's useful (kept-pair) FLOPs, so their ratio is the efficiency
    with segments relative to without (issue 22 asks for within 5%); the times are given
    too (tiles no query of a document sees are skipped, so packed rows take less time).
    """
    by_name = {r["case"]: r for r in rows}
    lines = []
    for r in rows:
        name = r["case"]
        if " docs" not in name:
            continue
        base = by_name.get(name.rsplit(" ", 2)[0])
        if base is None:
            continue
        for key, secs in (("fwd_tflops", "fwd_s"), ("fwd_bwd_tflops", "fwd_bwd_s")):
            a, b = r.get("ours", {}), base.get("ours", {})
            if isinstance(a.get(secs), float) and isinstance(b.get(secs), float):
                lines.append(f"{name} vs without, {key.split('_tflops')[0]}: "
                             f"{a[key]:.0f} vs {b[key]:.0f} TFLOP/s = {a[key] / b[key]:.3f}x; "
                             f"time {a[secs] * 1e3:.2f} vs {b[secs] * 1e3:.2f} ms")
    return "\n".join(lines)


def _variants(head_dim: int):
    base = gpu.BlockSizes.get_default(head_dim)
    rep = functools.partial(dataclasses.replace, base)
    if head_dim > 128:
        return {
            "default": base,
            "fused bwd": rep(backward="fused"),
            "fused bwd dkv 32x64": rep(backward="fused", block_q_dkv=32),
            "fwd 128x64 s2, bwd 64x64 s2": rep(block_q=128, block_k=64, block_q_dkv=64,
                                               block_kv_dq=64, num_stages_bwd=2),
            "fwd 64x64 w4, bwd 64x64 w4 s2": rep(num_warps=4, block_q_dkv=64, block_kv_dq=64,
                                                 num_warps_bwd=4, num_stages_bwd=2),
            "fwd 128x32 s2, bwd 16x64 dq 64x16": rep(block_q=128, block_k=32, block_q_dkv=16,
                                                    block_kv_dq=16, num_stages_bwd=2),
            "fwd 64x32 s3, bwd s2": rep(block_k=32, num_stages=3, num_stages_bwd=2),
        }
    return {
        "default": base,
        "fused bwd (dkv 64x128)": rep(backward="fused"),
        "fused bwd dkv 32x128": rep(backward="fused", block_q_dkv=32),
        "fused bwd dkv 64x64": rep(backward="fused", block_kv_dkv=64),
        "fused bwd s2": rep(backward="fused", num_stages_bwd=2),
        "fused bwd dkv 128x128 s2": rep(backward="fused", block_q_dkv=128, num_stages_bwd=2),
        "fwd 128x64 w8 s3": rep(block_k=64),
        "fwd 128x128 w4 s3": rep(num_warps=4),
        "bwd dkv 32x128 dq 128x32": rep(block_q_dkv=32, block_kv_dq=32),
        "bwd w8 s2": rep(num_stages_bwd=2),
    }


def sweep(head_dim: int):
    """Block sizes / warps / stages at S=8192 causal, forward and forward+backward."""
    case = Case(8192, True, head_dim=head_dim)
    q, k, v, do = _inputs(case)
    for name, bs in _variants(head_dim).items():
        t_f, t_fb = measure(case, _ours(case, bs), q, k, v, do)
        print(f"D={head_dim} {name:34s} fwd {_fmt(_tflops(case, t_f))} TF/s  fwd+bwd "
              f"{_fmt(_tflops(case, t_fb, 3.5))} TF/s  {bs}", flush=True)


def sweep_hopper(head_dim: int):
    """Tiles of the Hopper (Mosaic GPU) kernels at S=8192, causal and full.

    The forward alone, then the backward alone (from a saved forward), in TFLOP/s of
    the backward's count (2.5x the forward).
    """
    for causal in (True, False):
        case = Case(8192, causal, head_dim=head_dim)
        q, k, v, do = _inputs(case)
        o, lse = gpu.flash_attention_with_lse(q, k, v, causal=causal)
        delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
        for tiles in (gpu_hopper_bwd.HopperBackwardBlocks(bkv, bq, stages)
                      for bkv in (64, 128) for bq in (64, 128) for stages in (2, 3, 4)):
            if tiles.smem_bytes(head_dim) > gpu_hopper.SMEM_BYTES:
                continue
            fn = jax.jit(functools.partial(gpu_hopper_bwd.backward, causal=causal,
                                           sm_scale=head_dim**-0.5, blocks=tiles))
            try:
                t = median_time(fn, q, k, v, do, lse, delta)
                print(f"hopper bwd D={head_dim} {case.name} {tiles}: "
                      f"bwd {_fmt(_tflops(case, t, 2.5))} TF/s", flush=True)
            except Exception as e:  # noqa: BLE001 - a tiling the compiler rejects
                print(f"hopper bwd {case.name} {tiles}: {type(e).__name__}: {str(e)[:300]}",
                      flush=True)
    for causal in (True, False):
        case = Case(8192, causal, head_dim=head_dim)
        q, k, v, _ = _inputs(case)
        for block_kv in (64, 128, 256):
            for stages in (2, 3, 4):
                tiles = gpu_hopper.HopperBlocks(block_kv=block_kv, stages=stages)
                if tiles.smem_bytes(head_dim) > gpu_hopper.SMEM_BYTES:
                    continue
                fn = jax.jit(functools.partial(gpu_hopper.forward, causal=causal,
                                               sm_scale=head_dim**-0.5, blocks=tiles))
                try:
                    t = median_time(fn, q, k, v)
                    print(f"hopper D={head_dim} {case.name} bkv={block_kv} stages={stages}: "
                          f"fwd {_fmt(_tflops(case, t))} TF/s", flush=True)
                except Exception as e:  # noqa: BLE001 - a tiling the compiler rejects
                    print(f"hopper {case.name} bkv={block_kv} stages={stages}: "
                          f"{type(e).__name__}: {str(e)[:150]}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--sweep-hopper", action="store_true",
                        help="tiles of the Hopper forward (gpu_hopper.py)")
    parser.add_argument("--head-dim", type=int, default=128, help="for --sweep")
    parser.add_argument("--segments", type=int, default=None, metavar="DOCS",
                        help="only S=8k causal and full D=128 without and with segment ids "
                             "of DOCS packed documents per row")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__}, device: {jax.devices()[0].device_kind}", flush=True)
    if args.sweep:
        sweep(args.head_dim)
        return
    if args.sweep_hopper:
        sweep_hopper(args.head_dim)
        return
    if args.segments:
        cases = [Case(8192, c, docs=docs) for c in (True, False) for docs in (None, args.segments)]
    elif args.quick:
        cases = [Case(8192, True)]
    else:
        cases = [Case(8192, True), Case(8192, False)]
        cases += [Case(s, c) for s in (2048, 4096, 16384) for c in (False, True)]
        cases += [Case(8192, True, kv_heads=2), Case(8192, True, head_dim=64),
                  Case(8192, True, head_dim=256), Case(16384, True, window=4096),
                  Case(8192, True, docs=4)]
    rows = run_cases(cases)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"jax": jax.__version__, "device": jax.devices()[0].device_kind,
                       "rows": rows}, f, indent=1)
    print(table(rows))
    if any(case.docs for case in cases):
        print(segment_cost(rows))


if __name__ == "__main__":
    sys.exit(main())
