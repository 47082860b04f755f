"""Memory plan of a full-size train step, compiled ahead of time on emulated CPU devices.

Nothing is allocated: parameters, optimizer state and the batch are `jax.ShapeDtypeStruct`s
carrying their shardings (sharding/rules.py), and the step (loss, grads, AdamW update) is
lowered and compiled with `jax.jit(...).lower(...).compile()` for N emulated devices. XLA's
`compiled.memory_analysis()` then gives the per-device bytes of arguments, outputs and
temporaries, and the HLO text the collectives the partitioner inserted.

    python bench/plan.py --model=deepseek_v3                 # DeepSeek-V3 671B on 256 devices
    python bench/plan.py --model=llama3_70b --preset=fsdp_tp
    python bench/plan.py --model=llama3_70b --param-dtype=bfloat16 --out=bench/results/plan.md

Caveats (they matter when reading the numbers):
  * XLA:CPU compiles attention as the plain reference (scores [B, H, T, T] materialised);
    on GPU/TPU the flash kernels keep O(T) memory, so temporaries here are an upper bound.
  * DeepSeek-V3 has 3 dense layers then 58 MoE layers; `nnx.scan` needs identical layers,
    so the plan compiles 61 MoE layers (first_k_dense=0): ~30B parameters more than the
    real model (an upper bound, 4.6%).
  * Expert parallelism uses sharding/expert.py's padded all_to_all buffers (dropless by
    default). XLA:CPU lowers `jax.lax.ragged_dot` (the dropless experts) by expanding it
    to a masked dense product over every local expert, which inflates temporaries ~15x;
    GPU/TPU lower it to `chlo.ragged_dot`. `--gmm=kernel` plans the dropless experts with
    our Pallas grouped matmul instead (model.moe.gmm_impl, the kernel train.py runs on a
    GPU), charged as opaque calls whose device memory is their output alone, which is what
    the kernels allocate (`plan_gmm_kernels_as_opaque_calls`). `--dispatch=capacity`
    (exact-size buffers, batched einsums) is the other path.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

PLANS = {
    # name: (config module, config arg, devices, mesh, preset, global batch, seq)
    "deepseek_v3": ("deepseek_v3", "full", 256, {"fsdp": 32, "expert": 8}, "fsdp_ep", 256, 4096),
    "llama3_70b": ("llama3", "full,size=70b", 64, {"fsdp": 8, "tensor": 8}, "fsdp_tp", 8, 4096),
}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
LIMITS_GIB = {"H100 (80 GiB)": 80, "TPU v5p (95 GiB)": 95}


_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1,
                "s64": 8, "f64": 8}


def largest_values(hlo: str, n: int):
    """The n largest array values defined in the (per-device) HLO text: (bytes, line)."""
    found = []
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%\S+ = (\w+)\[([\d,]*)\]", line)
        if m and m.group(1) in _DTYPE_BYTES:
            dims = [int(d) for d in m.group(2).split(",") if d]
            size = _DTYPE_BYTES[m.group(1)]
            for d in dims:
                size *= d
            found.append((size, line.strip()))
    return sorted(found, key=lambda t: -t[0])[:n]


def plan_gmm_kernels_as_opaque_calls() -> None:
    """Register, for this process, stand-ins of the Pallas gmm/tgmm that XLA cannot see into.

    Each is a `jax.pure_callback` with the kernel's exact output shape and dtype, so the plan
    charges the grouped matmuls what the Pallas kernels allocate in device memory: their
    output and nothing else (they read lhs/rhs in tiles into SRAM/VMEM; the tile schedule,
    a few int32 per tile, is computed outside the kernel, in the plan too). Interpret mode
    would not do: it pads and upcasts whole operands (GiB-sized f32 copies per layer). The
    numbers the callbacks return are never computed (nothing runs), and the custom_vjp of
    pallas_kernels/grouped_matmul/api.py still routes the backward to gmm(transposed) + tgmm.
    """
    import jax
    import numpy as np

    from pallas_kernels.grouped_matmul import api, gpu

    def opaque(shape, dtype, *operands):
        out = jax.ShapeDtypeStruct(shape, dtype)
        return jax.pure_callback(lambda *_: np.zeros(shape, dtype), out, *operands)

    def gmm(lhs, rhs, group_sizes, *, transpose_rhs, out_dtype, tiles, interpret):
        n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
        return opaque((lhs.shape[0], n), out_dtype, lhs, rhs, group_sizes)

    def tgmm(lhs, dout, group_sizes, *, out_dtype, tiles, interpret):
        shape = (group_sizes.shape[0], lhs.shape[1], dout.shape[1])
        return opaque(shape, out_dtype, lhs, dout, group_sizes)

    api.register_backend("pallas_gpu", api.Kernels(gmm, tgmm, gpu.Tiles))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(PLANS), default="llama3_70b")
    p.add_argument("--preset", default=None, help="sharding preset (default: the plan's)")
    p.add_argument("--mesh", default=None, help="e.g. fsdp=32,expert=8 (default: the plan's)")
    p.add_argument("--batch", type=int, default=None, help="global batch in sequences")
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--remat", default="full", choices=("none", "full", "dots_saveable"))
    p.add_argument("--layers", type=int, default=None, help="fewer layers (to see how memory scales)")
    p.add_argument("--dispatch", default=None, choices=("dropless", "capacity"),
                   help="MoE dispatch (default: the config's)")
    p.add_argument("--capacity-factor", type=float, default=1.25, help="with --dispatch=capacity")
    p.add_argument("--capacity-scope", default="shard", choices=("global", "shard"),
                   help="with --dispatch=capacity (sharding/expert.py)")
    p.add_argument("--gmm", default="ragged_dot", choices=("ragged_dot", "kernel"),
                   help="the dropless experts' grouped matmul: XLA:CPU's ragged_dot (densely "
                        "expanded) or the Pallas gmm/tgmm as opaque calls (module docstring)")
    p.add_argument("--largest", type=int, default=0, help="print the N largest HLO values")
    p.add_argument("--out", default=None, help="append a markdown row to this file")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    module, arg, devices, mesh_cfg, preset, batch, seq = PLANS[args.model]
    if args.mesh:
        mesh_cfg = {k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))}
    preset = args.preset or preset
    batch, seq = args.batch or batch, args.seq or seq

    # Emulated devices: XLA reads this once, before jax initialises its backends.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={devices}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import importlib

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import sharding
    from arch import build_model, count_params

    cfg = importlib.import_module(f"configs.{module}").get_config(arg).model
    cfg.update(scan_layers=True, remat=args.remat, param_dtype=args.param_dtype, max_seq_len=max(seq, 8))
    if cfg.moe is not None:
        cfg.moe.first_k_dense = 0  # scan needs identical layers (see module docstring)
    if args.layers:
        cfg.num_layers = args.layers
    if cfg.moe is not None and args.dispatch:
        cfg.moe.dispatch = args.dispatch
        cfg.moe.capacity_factor = args.capacity_factor if args.dispatch == "capacity" else None
    if cfg.moe is not None and args.gmm == "kernel":
        cfg.moe.gmm_impl = "pallas_gpu"
        plan_gmm_kernels_as_opaque_calls()
    mesh, rules = sharding.make_mesh(mesh_cfg), sharding.make_rules(preset)
    sharding.check_model_config(cfg, mesh, rules)
    total, active = count_params(cfg)

    abstract = nnx.eval_shape(lambda: build_model(cfg, 0))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    tx = optax.adamw(1e-4, weight_decay=0.1)
    opt_state = jax.eval_shape(tx.init, params)

    def with_shardings(tree):
        shardings = sharding.state_shardings(tree, mesh, rules)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            tree, shardings), shardings

    params, p_sh = with_shardings(params)
    rest, _ = with_shardings(rest)
    opt_state, o_sh = with_shardings(opt_state)
    tokens = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32,
                                  sharding=sharding.batch_sharding((batch, seq + 1), mesh, rules))

    def loss_fn(p, rest, tokens):
        # Fresh Variable objects at this trace level (nnx.scan checks that they agree).
        rest = jax.tree.map(lambda x: x, rest)
        logits, aux = nnx.merge(graphdef, p, rest)(tokens[:, :-1])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        ce = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
        return ce + aux["moe_aux_loss"] + aux["moe_z_loss"]

    def step(p, rest, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(p, rest, tokens)
        updates, opt_state = tx.update(grads, opt_state, p)
        return loss, optax.apply_updates(p, updates), opt_state

    t0 = time.time()
    from sharding.expert import capacity_scope

    with sharding.activate(mesh, rules), capacity_scope(args.capacity_scope):
        lowered = jax.jit(step, out_shardings=(None, p_sh, o_sh), donate_argnums=(0, 2)).lower(
            params, rest, opt_state, tokens)
        compiled = lowered.compile()
    seconds = time.time() - t0
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    counts = {c: len(re.findall(rf"\s{c}(?:-start)?\(", hlo)) for c in COLLECTIVES}
    gib = 1024 ** 3
    arg_b, out_b, tmp_b = mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.temp_size_in_bytes
    alias_b = getattr(mem, "alias_size_in_bytes", 0)
    peak = arg_b + out_b - alias_b + tmp_b
    fits = {name: peak <= lim * gib for name, lim in LIMITS_GIB.items()}
    mesh_s = ",".join(f"{k}={v}" for k, v in dict(mesh.shape).items() if v > 1)
    print(f"{args.model}: {total / 1e9:.1f}B params ({active / 1e9:.1f}B active), {mesh.size} devices "
          f"[{mesh_s}], preset {rules.name}, batch {batch}x{seq}, params {args.param_dtype}, "
          f"remat {args.remat}; compiled in {seconds:.0f}s")
    print(f"  per device: arguments {arg_b / gib:.2f} GiB, outputs {out_b / gib:.2f} GiB "
          f"(aliased {alias_b / gib:.2f}), temporaries {tmp_b / gib:.2f} GiB -> peak {peak / gib:.2f} GiB")
    print(f"  fits: {fits}")
    print(f"  collectives in HLO: {counts}")
    if args.largest:
        for size, line in largest_values(hlo, args.largest):
            print(f"  {size / gib:8.2f} GiB  {line[:160]}")
    if args.out:
        row = (f"| {args.model} | {total / 1e9:.0f}B | {mesh.size} | {mesh_s} | {rules.name} | "
               f"{batch}x{seq} | {args.param_dtype} | {args.remat} | {arg_b / gib:.1f} | "
               f"{out_b / gib:.1f} | {tmp_b / gib:.1f} | {peak / gib:.1f} | "
               + " | ".join("yes" if fits[n] else "no" for n in LIMITS_GIB) + " | "
               + ", ".join(f"{c} {n}" for c, n in counts.items()) + f" | {seconds:.0f}s |\n")
        with open(args.out, "a") as f:
            f.write(row)


if __name__ == "__main__":
    main()
