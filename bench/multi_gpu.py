"""Benchmark: several GPUs of one host — ring attention, expert parallelism, FSDP scaling.

    PYTHONPATH=. python bench/multi_gpu.py --out bench/results/multi_gpu.md   # all GPUs, sized for ~7 min on 2
    PYTHONPATH=. python bench/multi_gpu.py --skip-ep --skip-fsdp --seqs 32k,512k
    PYTHONPATH=. python bench/multi_gpu.py --quick --cpu-devices=4             # tiny sizes, emulated CPU devices

N = the number of devices used (`--devices`, default all of them).

(1) Ring attention (Liu et al. 2023; Striped Attention, Brandon et al. 2023): causal,
    B=1, H=16, D=128, bf16, total lengths S (default 32k..256k), each GPU holding
    L = S/N tokens, striped vs contiguous layout, Pallas GPU kernel as the block worker.
    Inputs are already in the layout and sharded (models permute once at the input), so
    the timed function is `ring_attention_in_layout`.
    * FLOPs: useful causal FLOPs, half of 4·B·H·S²·D forward; forward+backward = 3.5x.
      A ring GPU is credited with 1/N of the total.
    * ratio = (ring TFLOP/s per GPU) / (TFLOP/s of the plain flash kernel on ONE GPU at
      length L = S/N). The two do different work (a ring GPU has N times the pairs of the
      plain kernel at L), so the ratio asks: does a GPU of the ring run as fast as the
      kernel on its own share? Equivalently ratio = N · t_flash(L) / t_ring(S).
    * compute alone: the busiest GPU's (the last one's) block computations and merges,
      run on one GPU with its K/V blocks already in place (no ppermute), blocks
      rematerialised in the backward as the ring's custom VJP does. exposed comm =
      ring time − compute alone: communication (and imbalance between GPUs) that the
      overlap did not hide. `rotate alone` times the forward's N−1 K/V ppermutes alone.
    * correctness: for S <= --check-max, the ring output against the plain kernel on one
      GPU over the full sequence (max abs error; tolerance 1e-2·max|o| in bf16, 1e-4 in f32).
(2) Expert parallelism: trainer.step.train_step (loss, backward, AdamW update) of
    configs/deepseek_v3.py:small (MLA, 64 experts top-6) on meshes expert = 1, 2, .., N,
    tokens split over the expert axis, MoE dispatch through sharding/expert.py
    (all_to_all inside shard_map); tokens/s and the collectives in the compiled HLO.
(3) FSDP: the same train step of configs/llama3.py:small (~0.9B) on meshes fsdp = 1, 2,
    .., N (powers of two, the first k GPUs), a fixed batch per GPU: tokens/s per GPU.

Llama's layers are scanned (`--no-scan`: a list): compiles fast, and a collective in the
scanned layer body appears ONCE in the HLO counts although it runs once per layer.
DeepSeek's are a list (`nnx.scan` needs identical layers; its first layer is dense), 4
by default (`--ep-layers`) to compile fast: 1 dense + 3 MoE.

Times: median of `--reps` calls (steps) after `--warmup` calls, each ended by
`block_until_ready`. Out-of-memory rows read "OOM" and the run goes on.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import os
import re
import statistics
import sys
import time

if __name__ == "__main__":  # --cpu-devices=K before jax starts: XLA reads the flag once
    _k = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--cpu-devices=")), None)
    if _k:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={_k}").strip()
        os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import arch  # noqa: E402
import optim  # noqa: E402
import sharding  # noqa: E402
from bench.plan import COLLECTIVES  # noqa: E402
from bench.train_mfu import is_oom, random_batch  # noqa: E402
from configs import deepseek_v3, llama3  # noqa: E402
from pallas_kernels._compat import shard_map  # noqa: E402
from pallas_kernels.flash_attention import flash_attention  # noqa: E402
from pallas_kernels.ring_attention import (  # noqa: E402
    LAYOUTS,
    layout_positions,
    merge_partials,
    ring_attention_in_layout,
    to_layout,
)
from pallas_kernels.ring_attention.block import (  # noqa: E402
    BlockConfig,
    block_attention,
    block_is_live,
    resolve_impl,
)
from trainer.mfu import flops_per_token, format_mfu, mfu  # noqa: E402
from trainer.step import StepOptions, train_step  # noqa: E402


def _import_ring_bench():
    """bench/ring_attention.py, for its `_time` and `_mesh`. Importing it sets XLA_FLAGS and
    JAX_PLATFORMS for its own CPU mode; restore our environment before jax starts."""
    saved = dict(os.environ)
    try:
        from bench import ring_attention
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return ring_attention


ring_bench = _import_ring_bench()

F32 = jnp.float32
FWD_BWD = 3.5  # forward+backward FLOPs / forward FLOPs (FlashAttention-2's count)


# ----------------------------------------------------------------------------- helpers
@dataclasses.dataclass
class Table:
    """A markdown table with a title and notes below it."""

    title: str
    header: list[str]
    rows: list[list[str]] = dataclasses.field(default_factory=list)
    notes: str = ""

    def markdown(self) -> str:
        lines = [f"## {self.title}", "", "| " + " | ".join(self.header) + " |",
                 "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(map(str, r)) + " |" for r in self.rows]
        return "\n".join(lines + ([""] + [self.notes] if self.notes else [])) + "\n"


def guarded(fn, *args, **kwargs):
    """fn(*args, **kwargs), or None when the device runs out of memory (the row says OOM)."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - only out-of-memory is caught, the rest propagates
        if not is_oom(e):
            raise
        print(f"  OOM: {str(e).splitlines()[0][:160]}", flush=True)
        gc.collect()
        return None


def _ms(seconds) -> str:
    return "OOM" if seconds is None else f"{1e3 * seconds:.2f}"


def _num(x, spec="{:.3g}") -> str:
    return "OOM" if x is None else spec.format(x)


def parse_seq(text: str) -> int:
    """'32k' -> 32768, '1000' -> 1000."""
    text = text.strip().lower()
    return int(text[:-1]) * 1024 if text.endswith("k") else int(text)


def causal_flops(batch: int, heads: int, seq: int, head_dim: int) -> float:
    """Forward FLOPs of causal attention: half of 4·B·H·S²·D (two matmuls over half the pairs)."""
    return 2.0 * batch * heads * seq**2 * head_dim


def fwd_and_grad(f):
    """(jit(f), jit(grad of sum(f) w.r.t. the first three arguments q, k, v))."""
    loss = lambda *a: jnp.sum(f(*a).astype(F32))
    return jax.jit(f), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def count_collectives(hlo: str) -> dict[str, int]:
    """Collective ops in compiled HLO text (async ones counted at their -start), as bench/plan.py."""
    return {c: len(re.findall(rf"\s{c}(?:-start)?\(", hlo)) for c in COLLECTIVES}


def powers_of_two(n: int) -> list[int]:
    return [2**i for i in range(n.bit_length()) if 2**i <= n]


# ----------------------------------------------------------------------------- (1) ring attention
def ring_without_rotation(n: int, q_pos, kv_pos, cfg: BlockConfig):
    """fn(q_d, k, v) -> o_d: the ring's compute on its LAST device, on one device, no transfer.

    The last device is the busiest in both layouts (contiguous + causal: every block is
    live there). Blocks come in the ring's order (step j brings the block of device
    d - j), dead ones skipped as the ring's `lax.cond` skips them, partial results merged
    by log-sum-exp. Each block is rematerialised in the backward (`jax.checkpoint`), as
    the ring's custom VJP recomputes it, so both do the same arithmetic.

    Args:
      n: ring size.
      q_pos: int [B, T/N] global positions of the last device's queries (numpy).
      kv_pos: int [B, T] global positions of all keys, in the layout (numpy).
      cfg: the block worker's settings.
    """
    d, tl = n - 1, kv_pos.shape[1] // n
    slices = [slice(src * tl, (src + 1) * tl) for src in ((d - j) % n for j in range(n))]
    live = [sl for sl in slices if bool(block_is_live(q_pos, kv_pos[:, sl], None, None, cfg))]
    work = jax.checkpoint(functools.partial(block_attention, cfg=cfg))

    def fn(q_d, k, v):
        b, t, h, _ = q_d.shape
        o = jnp.zeros((b, t, h, v.shape[3]), F32)
        lse = jnp.full((b, h, t), -jnp.inf, F32)
        for sl in live:
            o_j, lse_j = work(q_d, k[:, sl], v[:, sl], jnp.asarray(q_pos), jnp.asarray(kv_pos[:, sl]),
                              None, None)
            o, lse = merge_partials(o, lse, o_j, lse_j)
        return o.astype(q_d.dtype)

    return fn


def rotation_only(mesh, n: int):
    """jit fn(k, v): the forward ring's N-1 K/V rotations (ppermute i -> i+1) and nothing else."""
    spec = P(None, "sequence")
    perm = [(i, (i + 1) % n) for i in range(n)]

    def body(k, v):
        return lax.fori_loop(0, n - 1, lambda _, kv: lax.ppermute(kv, "sequence", perm), (k, v))

    return jax.jit(shard_map(body, mesh=mesh, in_specs=(spec, spec), out_specs=(spec, spec),
                             check_vma=False))


def ring_section(args, devices) -> dict:
    """Ring vs plain kernel per total length and layout; returns rows, checks and tables."""
    n = len(devices)
    impl = resolve_impl(args.ring_impl)
    flash_impl = "pallas_gpu" if impl == "pallas_gpu" else "reference"
    dtype = jnp.dtype(args.dtype)
    b, h, dh = 1, args.heads, args.head_dim
    mesh = ring_bench._mesh(n)
    sh = NamedSharding(mesh, P(None, "sequence"))
    cfg = BlockConfig(impl=impl, causal=True)
    time_it = functools.partial(ring_bench._time, reps=args.reps, warmup=args.warmup)
    rows, checks = [], []
    for s in args.seqs:
        ln = s // n
        print(f"ring: S={s} (L={ln} per device)", flush=True)
        key = jax.random.key(s)
        # The plain kernel on one device at the per-device length L.
        ks = jax.random.split(jax.random.fold_in(key, 1), 3)
        q1, k1, v1 = (jax.random.normal(kk, (b, ln, h, dh), dtype) for kk in ks)
        flash = lambda q, k, v: flash_attention(q, k, v, causal=True, impl=flash_impl)
        f_fwd, f_grad = fwd_and_grad(flash)
        flash_t = {"fwd": guarded(time_it, f_fwd, q1, k1, v1),
                   "fwd+bwd": guarded(time_it, f_grad, q1, k1, v1)}
        del q1, k1, v1
        # The full sequence in natural order on device 0; the ring gets it in each layout.
        ks = jax.random.split(key, 3)
        qn, kn, vn = (jax.random.normal(kk, (b, s, h, dh), dtype) for kk in ks)
        o_ref = guarded(jax.jit(flash), qn, kn, vn) if s <= args.check_max else None
        rotate_s = None
        if n > 1:
            kr = jax.device_put(kn, sh)
            rotate_s = guarded(time_it, rotation_only(mesh, n), kr, kr)
            del kr
        for layout in LAYOUTS:
            perm = functools.partial(to_layout, n=n, layout=layout, axis=1)
            q, k, v = (jax.device_put(perm(x), sh) for x in (qn, kn, vn))
            pos_np = layout_positions(s, n, layout, batch=b)
            pos = jax.device_put(jnp.asarray(pos_np), sh)
            ring = lambda q, k, v, pos: ring_attention_in_layout(q, k, v, mesh=mesh, positions=pos,
                                                                 causal=True, impl=impl)
            r_fwd, r_grad = fwd_and_grad(ring)
            ring_t = {"fwd": guarded(time_it, r_fwd, q, k, v, pos),
                      "fwd+bwd": guarded(time_it, r_grad, q, k, v, pos)}
            if o_ref is not None and ring_t["fwd"] is not None:
                o_ring = jax.device_put(r_fwd(q, k, v, pos), devices[0])
                ref = perm(o_ref).astype(F32)
                err = float(jnp.max(jnp.abs(o_ring.astype(F32) - ref)))
                scale = float(jnp.max(jnp.abs(ref)))
                tol = (1e-4 if dtype == jnp.float32 else 1e-2) * max(1.0, scale)
                checks.append({"seq": s, "layout": layout, "max_abs_err": err, "max_abs_ref": scale,
                               "tol": tol, "ok": err <= tol})
                del o_ring, ref
            del q, k, v, pos
            # The busiest device's compute alone, on device 0 (its queries, all K/V in the layout).
            qd = perm(qn)[:, (n - 1) * ln:]
            kl, vl = perm(kn), perm(vn)
            alone = ring_without_rotation(n, pos_np[:, (n - 1) * ln:], pos_np, cfg)
            a_fwd, a_grad = fwd_and_grad(alone)
            alone_t = {"fwd": guarded(time_it, a_fwd, qd, kl, vl),
                       "fwd+bwd": guarded(time_it, a_grad, qd, kl, vl)}
            del qd, kl, vl
            for pas, mult in (("fwd", 1.0), ("fwd+bwd", FWD_BWD)):
                rt, ft, at = ring_t[pas], flash_t[pas], alone_t[pas]
                ring_tf = None if rt is None else causal_flops(b, h, s, dh) * mult / n / rt / 1e12
                flash_tf = None if ft is None else causal_flops(b, h, ln, dh) * mult / ft / 1e12
                rows.append(dict(
                    seq=s, per_device=ln, layout=layout, pass_=pas, ring_s=rt, flash_s=ft,
                    ring_tflops=ring_tf, flash_tflops=flash_tf,
                    ratio=None if ring_tf is None or flash_tf is None else ring_tf / flash_tf,
                    alone_s=at, exposed_s=None if rt is None or at is None else rt - at,
                    rotate_s=rotate_s if pas == "fwd" else None))
        del qn, kn, vn, o_ref
        gc.collect()
    return {"rows": rows, "checks": checks, "tables": ring_tables(rows, checks, args, n, impl)}


def _k(s: int) -> str:
    return f"{s // 1024}k" if s % 1024 == 0 else str(s)


def ring_tables(rows, checks, args, n, impl) -> list[Table]:
    perf = Table(
        f"Ring attention on {n} device(s): causal, B=1 H={args.heads} D={args.head_dim} "
        f"{args.dtype}, block worker {impl}",
        ["S total", "L per device", "layout", "pass", "ring ms", "ring TFLOP/s per device",
         "flash(L) ms", "flash(L) TFLOP/s", "ratio", "compute alone ms", "exposed comm ms (%)",
         "rotate alone ms"],
        notes=("ratio = ring TFLOP/s per device / plain flash kernel TFLOP/s on one device at "
               "L = S/N (= N·t_flash(L) / t_ring); useful causal FLOPs 2·B·H·S²·D forward, x3.5 "
               "fwd+bwd, 1/N per ring device. compute alone: the last device's blocks and merges "
               "on one device, no ppermute (backward recomputes blocks, as the ring does); "
               "exposed comm = ring − compute alone (communication and imbalance not hidden). "
               "rotate alone: the forward's N−1 K/V ppermutes with no compute."))
    for r in rows:
        exposed = ("OOM" if r["exposed_s"] is None else
                   f"{1e3 * r['exposed_s']:.2f} ({100 * r['exposed_s'] / r['ring_s']:.0f}%)")
        perf.rows.append([_k(r["seq"]), _k(r["per_device"]), r["layout"], r["pass_"], _ms(r["ring_s"]),
                          _num(r["ring_tflops"]), _ms(r["flash_s"]), _num(r["flash_tflops"]),
                          _num(r["ratio"], "{:.2f}"), _ms(r["alone_s"]), exposed,
                          "-" if r["rotate_s"] is None else _ms(r["rotate_s"])])
    check = Table(f"Ring output vs the plain kernel over the full sequence on one device ({args.dtype})",
                  ["S total", "layout", "max abs err", "max abs output", "tolerance", "ok"])
    for c in checks:
        check.rows.append([_k(c["seq"]), c["layout"], f"{c['max_abs_err']:.3g}",
                           f"{c['max_abs_ref']:.3g}", f"{c['tol']:.3g}", "yes" if c["ok"] else "NO"])
    return [perf, check]


# ----------------------------------------------------------------------------- (2), (3) train steps
def train_throughput(cfg, mesh, rules, *, batch: int, seq: int, warmup: int, reps: int) -> dict:
    """Median seconds per `trainer.step.train_step` on `mesh` and its compiled HLO's collectives.

    Model and AdamW state are created sharded by their logical axes (sharding.create_sharded:
    no device holds a whole unsharded copy); the batch is random tokens split over the
    rules' batch axes.
    """
    sharding.check_model_config(cfg.model, mesh, rules)

    def init():
        model = arch.build_model(cfg.model, 0)
        tx = optim.build_optimizer(cfg.optim, nnx.state(model, nnx.Param), total_steps=10_000)
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    model, optimizer = sharding.create_sharded(init, mesh, rules)
    data = {k: np.asarray(x) for k, x in random_batch(batch, seq, cfg.model.vocab_size).items()}
    data = sharding.shard_batch(data, mesh, rules)
    opts = StepOptions.from_config(cfg)
    with sharding.activate(mesh, rules):  # arch.moe dispatches through sharding.expert
        hlo = train_step.lower(model, optimizer, data, opts=opts).compile().as_text()
        for _ in range(warmup):
            jax.block_until_ready(train_step(model, optimizer, data, opts=opts))
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(train_step(model, optimizer, data, opts=opts))
            times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "collectives": count_collectives(hlo)}


def _train_row(cfg, mesh_cfg, devices, preset, args, batch_per_device, seq) -> dict:
    k = len(devices)
    mesh = sharding.make_mesh(mesh_cfg, devices=devices)
    rules = sharding.make_rules(preset) if preset else sharding.rules_for_mesh(mesh)
    batch = batch_per_device * k
    print(f"train: {cfg.model.family} on {k} device(s), mesh {mesh_cfg}, rules {rules.name}, "
          f"batch {batch}x{seq}", flush=True)
    jax.clear_caches()
    out = guarded(train_throughput, cfg, mesh, rules, batch=batch, seq=seq,
                  warmup=args.warmup, reps=args.reps)
    gc.collect()
    row = {"devices": k, "mesh": ",".join(f"{a}={v}" for a, v in mesh_cfg.items()),
           "rules": rules.name, "batch": batch, "seq": seq, "step_s": None, "tokens_per_s": None,
           "tokens_per_s_per_device": None, "mfu": None, "collectives": None}
    if out is not None:
        tps = batch * seq / out["step_s"]
        row.update(step_s=out["step_s"], tokens_per_s=tps, tokens_per_s_per_device=tps / k,
                   collectives=out["collectives"],
                   mfu=mfu(tps, flops_per_token(cfg.model, seq), devices[0].device_kind, k))
    return row


def ep_section(args, devices, device_counts=None) -> dict:
    """EP train step on the first k devices, k in `device_counts` (default 1, 2, 4, .., N)."""
    cfg = deepseek_v3.get_config("tiny" if args.quick else "small")
    cfg.model.update(num_layers=args.ep_layers, scan_layers=False, remat=args.remat)
    moe = cfg.model.moe  # keep at least one MoE layer
    moe.first_k_dense = min(moe.first_k_dense, args.ep_layers - 1)
    if args.ep_dispatch == "capacity":
        cfg.model.moe.update(dispatch="capacity", capacity_factor=1.25)
    seq = min(args.ep_seq, cfg.model.max_seq_len)
    rows = [_train_row(cfg, {"expert": k}, devices[:k], None, args, args.ep_batch, seq)
            for k in device_counts or powers_of_two(len(devices))]
    m = cfg.model
    table = Table(
        f"Expert parallelism: DeepSeek-V3-style MoE train step ({m.num_layers} layers, d_model "
        f"{m.d_model}, {m.moe.num_experts} experts top-{m.moe.top_k}, {m.moe.dispatch} dispatch, "
        f"scan={m.scan_layers}, remat={m.remat})",
        ["devices", "mesh", "rules", "batch x seq", "step ms", "tokens/s", "tokens/s per device",
         "MFU", "all-to-all in HLO", "other collectives in HLO"],
        notes=("Step = trainer.step.train_step: forward, backward, AdamW update. Tokens split over "
               "the expert axis outside MoE layers; experts split over it. HLO counts are static "
               "ops: one in a scanned layer body runs once per layer."))
    for r in rows:
        c = r["collectives"]
        table.rows.append([r["devices"], r["mesh"], r["rules"], f"{r['batch']}x{r['seq']}",
                           _ms(r["step_s"]), _num(r["tokens_per_s"], "{:,.0f}"),
                           _num(r["tokens_per_s_per_device"], "{:,.0f}"), format_mfu(r["mfu"]),
                           "OOM" if c is None else c["all-to-all"],
                           "OOM" if c is None else ", ".join(f"{k} {v}" for k, v in c.items()
                                                              if k != "all-to-all" and v)])
    return {"rows": rows, "tables": [table]}


def fsdp_section(args, devices, device_counts=None) -> dict:
    """FSDP train step on the first k devices, k in `device_counts` (default 1, 2, 4, .., N)."""
    cfg = llama3.get_config("tiny" if args.quick else "small")
    cfg.model.update(scan_layers=args.scan, remat=args.remat)
    if args.fsdp_layers:
        cfg.model.num_layers = args.fsdp_layers
    seq = min(args.fsdp_seq, cfg.model.max_seq_len)
    rows = [_train_row(cfg, {"fsdp": k}, devices[:k], "fsdp", args, args.fsdp_batch, seq)
            for k in device_counts or powers_of_two(len(devices))]
    m = cfg.model
    total, _ = arch.count_params(m)
    table = Table(
        f"FSDP scaling: Llama-3-style dense train step ({total / 1e9:.2f}B parameters, "
        f"{m.num_layers} layers, scan={m.scan_layers}, remat={m.remat}), "
        f"{args.fsdp_batch} sequences per device",
        ["devices", "mesh", "batch x seq", "step ms", "tokens/s", "tokens/s per device",
         "per-device vs 1 device", "MFU", "all-gather", "reduce-scatter", "all-reduce"],
        notes=("Parameters, gradients and AdamW state split over fsdp (ZeRO-3); weights "
               "all-gathered per layer. HLO counts are static ops (a scanned body counts once)."))
    base = rows[0]["tokens_per_s_per_device"] if rows else None
    for r in rows:
        c, t = r["collectives"], r["tokens_per_s_per_device"]
        table.rows.append([r["devices"], r["mesh"], f"{r['batch']}x{r['seq']}", _ms(r["step_s"]),
                           _num(r["tokens_per_s"], "{:,.0f}"), _num(t, "{:,.0f}"),
                           "OOM" if t is None or not base else f"{t / base:.2f}",
                           format_mfu(r["mfu"])]
                          + ["OOM" if c is None else c[name]
                             for name in ("all-gather", "reduce-scatter", "all-reduce")])
    return {"rows": rows, "tables": [table]}


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, f32, few steps: checks the script (CPU, reference kernels)")
    p.add_argument("--out", default=None, help="also write every table to this markdown file")
    p.add_argument("--devices", type=int, default=None, help="use the first K devices (default: all)")
    p.add_argument("--cpu-devices", type=int, default=None,
                   help="emulate K CPU devices (read before jax starts; script use only)")
    p.add_argument("--skip-ring", action="store_true")
    p.add_argument("--skip-ep", action="store_true")
    p.add_argument("--skip-fsdp", action="store_true")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions / steps (median)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (the first compiles)")
    g = p.add_argument_group("ring attention")
    g.add_argument("--seqs", default=None, help="total lengths, e.g. 32k,64k,128k,256k")
    g.add_argument("--heads", type=int, default=None)
    g.add_argument("--head-dim", type=int, default=None)
    g.add_argument("--dtype", default=None, choices=("bfloat16", "float32"))
    g.add_argument("--ring-impl", default="auto", help="block worker: auto | pallas_gpu | reference")
    g.add_argument("--check-max", default="128k", help="compare with one device up to this length")
    g = p.add_argument_group("train steps")
    g.add_argument("--ep-layers", type=int, default=None, help="DeepSeek layers (default 4)")
    g.add_argument("--ep-dispatch", default="dropless", choices=("dropless", "capacity"))
    g.add_argument("--ep-batch", type=int, default=None, help="sequences per device")
    g.add_argument("--ep-seq", type=int, default=None)
    g.add_argument("--fsdp-layers", type=int, default=None, help="Llama layers (default: config)")
    g.add_argument("--fsdp-batch", type=int, default=None, help="sequences per device")
    g.add_argument("--fsdp-seq", type=int, default=None)
    g.add_argument("--no-scan", dest="scan", action="store_false", help="Llama layers as a list")
    g.add_argument("--remat", default="none", choices=("none", "full", "dots_saveable"))
    args = p.parse_args(argv)
    q = args.quick
    defaults = dict(reps=2 if q else 3, warmup=1, seqs="256" if q else "32k,64k,128k,256k",
                    heads=2 if q else 16, head_dim=16 if q else 128,
                    dtype="float32" if q else "bfloat16", ep_batch=2 if q else 4,
                    ep_seq=32 if q else 2048, fsdp_batch=2 if q else 4, fsdp_seq=32 if q else 4096,
                    ep_layers=1 if q else 4, fsdp_layers=1 if q else None)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if q and args.ring_impl == "auto":
        args.ring_impl = "reference"
    args.seqs = [parse_seq(s) for s in args.seqs.split(",")]
    args.check_max = parse_seq(args.check_max)
    return args


def check_args(args, n: int) -> None:
    """ValueError naming the flag, before any compute."""
    if args.cpu_devices is not None and jax.device_count() != args.cpu_devices:
        raise ValueError(f"--cpu-devices={args.cpu_devices} had no effect ({jax.device_count()} "
                         "devices): pass it as --cpu-devices=K to the script, read before jax starts")
    if not 1 <= n <= jax.device_count():
        raise ValueError(f"--devices={n} must be between 1 and the {jax.device_count()} devices")
    bad = [s for s in args.seqs if s < n or s % n]
    if bad:
        raise ValueError(f"--seqs {bad} must be positive multiples of the {n} devices")
    for name in ("reps", "warmup", "heads", "head_dim", "ep_layers", "ep_batch", "ep_seq",
                 "fsdp_batch", "fsdp_seq"):
        least = 0 if name == "warmup" else 1
        if getattr(args, name) < least:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= {least}")


def header(devices) -> str:
    d = devices[0]
    return (f"# Multi-device benchmark (bench/multi_gpu.py): {len(devices)} x {d.device_kind} "
            f"({d.platform}), jax {jax.__version__}, {time.strftime('%Y-%m-%d')}\n")


def main(argv=None) -> dict:
    """Run the sections; print (and with --out write) their tables; return rows and tables."""
    args = parse_args(argv)
    n = jax.device_count() if args.devices is None else args.devices
    check_args(args, n)
    devices = jax.devices()[:n]
    print(header(devices), flush=True)
    results = {}
    for name, skip, section in (("ring", args.skip_ring, ring_section),
                                ("ep", args.skip_ep, ep_section),
                                ("fsdp", args.skip_fsdp, fsdp_section)):
        if skip:
            continue
        t0 = time.perf_counter()
        results[name] = section(args, devices)
        for table in results[name]["tables"]:
            print(table.markdown(), flush=True)
        print(f"({name}: {time.perf_counter() - t0:.0f} s)\n", flush=True)
        jax.clear_caches()
        gc.collect()
    text = header(devices) + "\n" + "\n".join(
        t.markdown() for r in results.values() for t in r["tables"])
    results["markdown"] = text
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return results


if __name__ == "__main__":
    main()
