"""Benchmark: ring / striped attention — work balance, memory per device, ring overhead.

    PYTHONPATH=. python bench/ring_attention.py          # (a) + (b) on 8 emulated CPU devices
    PYTHONPATH=. python bench/ring_attention.py --gpu    # (c) on one GPU

(a) Work balance (Brandon et al. 2023, Striped Attention, sec. 3): per device of an
    8-device ring, the (query block, key block) tiles a flash kernel computes (those with
    any unmasked pair) and the K/V blocks the ring computes at all (those not skipped by
    the position bounds), causal, contiguous vs striped. The ring's step time follows the
    busiest device, so max/mean is the slowdown from imbalance.
(b) Memory per device: `compiled.memory_analysis()` of the jitted forward+backward (f32,
    reference block worker) at a fixed total length, rings of N = 1, 2, 4, 8 devices.
    Arguments and outputs fall as 1/N; temporaries (the block's logits, [T/N]^2) faster.
(c) --gpu: one GPU, the ring machinery at N = 1 (shard_map, lse merge, custom VJP that
    recomputes the block in the backward) around the Pallas GPU kernel, against the
    kernel called directly: the overhead of the ring itself. Times are medians of
    repetitions after warm-up, ended by `block_until_ready`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if "--gpu" not in sys.argv:  # 8 emulated CPU devices; XLA reads the flag once, at import
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from pallas_kernels.ring_attention import layout_positions, ring_attention_in_layout, tile_counts  # noqa: E402
from pallas_kernels.ring_attention.block import BlockConfig, block_is_live  # noqa: E402

MiB = 2**20


def _mesh(n: int):
    return jax.make_mesh((n,), ("sequence",), devices=jax.devices()[:n],
                         axis_types=(AxisType.Auto,))


# ----------------------------------------------------------------------------- (a)
def live_blocks(seq_len: int, n: int, layout: str, causal: bool) -> np.ndarray:
    """K/V blocks each device computes after the ring's lax.cond skipping, int [n]."""
    pos = layout_positions(seq_len, n, layout).reshape(n, 1, -1)  # [device, 1, T/N]
    cfg = BlockConfig(impl="reference", causal=causal)
    return np.array([sum(bool(block_is_live(pos[d], pos[e], None, None, cfg)) for e in range(n))
                     for d in range(n)])


def work_balance(seq_len=8192, n=8, block=128):
    print(f"\n## (a) Work balance: causal, T={seq_len}, ring of N={n}, tiles of {block}x{block}\n")
    rows = {layout: (tile_counts(seq_len, n, layout, block=block, causal=True),
                     live_blocks(seq_len, n, layout, causal=True))
            for layout in ("contiguous", "striped")}
    print("| layout | " + " | ".join(f"dev {d}" for d in range(n)) + " | max/mean tiles | total tiles |")
    print("|---" * (n + 3) + "|")
    for layout, (tiles, blocks) in rows.items():
        cells = " | ".join(f"{t} ({b})" for t, b in zip(tiles, blocks, strict=True))
        print(f"| {layout} | {cells} | {tiles.max() / tiles.mean():.3f} | {tiles.sum()} |")
    print("\nCells: tiles with an unmasked pair (K/V blocks computed after skipping).")


# ----------------------------------------------------------------------------- (b)
def memory(seq_len=2048, batch=1, heads=4, head_dim=64):
    print(f"\n## (b) Memory per device: forward+backward, f32, B={batch} T={seq_len} "
          f"H={heads} D={head_dim}, causal, striped, reference worker\n")
    print("| N | arguments MiB | outputs MiB | temporaries MiB | total MiB | total x N / total(N=1) |")
    print("|---|---|---|---|---|---|")
    base = None
    for n in (1, 2, 4, 8):
        mesh = _mesh(n)
        sh = NamedSharding(mesh, P(None, "sequence"))
        shape = jax.ShapeDtypeStruct((batch, seq_len, heads, head_dim), jnp.float32, sharding=sh)
        pos = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=sh)

        def loss(q, k, v, pos, mesh=mesh):
            o = ring_attention_in_layout(q, k, v, mesh=mesh, positions=pos, causal=True,
                                         impl="reference")
            return jnp.sum(o * o)

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape, pos).compile()
        m = compiled.memory_analysis()
        arg, out, tmp = m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes
        total = arg + out + tmp
        base = total if base is None else base
        print(f"| {n} | {arg / MiB:.2f} | {out / MiB:.2f} | {tmp / MiB:.2f} | {total / MiB:.2f} | "
              f"{total * n / base:.2f} |")


# ----------------------------------------------------------------------------- (c)
def _time(fn, *args, reps=10, warmup=2):
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gpu_overhead(batch=4, seq_len=8192, heads=16, kv_heads=16, head_dim=128):
    from pallas_kernels.flash_attention import gpu

    dev = jax.devices()[0]
    print(f"\n## (c) Ring at N=1 vs the plain Pallas GPU kernel: {dev.device_kind}, "
          f"jax {jax.__version__}\n")
    print("| case | kernel fwd ms | ring fwd ms | ratio | kernel fwd+bwd ms | ring fwd+bwd ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    mesh = _mesh(1)
    for causal in (True, False):
        ks = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(ks[0], (batch, seq_len, heads, head_dim), jnp.bfloat16)
        k = jax.random.normal(ks[1], (batch, seq_len, kv_heads, head_dim), jnp.bfloat16)
        v = jax.random.normal(ks[2], (batch, seq_len, kv_heads, head_dim), jnp.bfloat16)
        pos = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
        plain = lambda q, k, v, causal=causal: gpu.flash_attention_with_lse(q, k, v, causal=causal)[0]
        ring = lambda q, k, v, causal=causal, pos=pos: ring_attention_in_layout(
            q, k, v, mesh=mesh, positions=pos, causal=causal, impl="pallas_gpu")
        row = []
        for f in (plain, ring):
            row.append(_time(jax.jit(f), q, k, v))
        for f in (plain, ring):
            grad = jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v).astype(jnp.float32)),
                                    argnums=(0, 1, 2)))
            row.append(_time(grad, q, k, v))
        kf, rf, kb, rb = (1e3 * t for t in row)
        name = f"B={batch} S={seq_len // 1024}k H={heads} D={head_dim} {'causal' if causal else 'full'}"
        print(f"| {name} | {kf:.2f} | {rf:.2f} | {rf / kf:.2f} | {kb:.2f} | {rb:.2f} | {rb / kb:.2f} |")
    print("\nThe ring's backward recomputes each block's forward (jax.vjp of the kernel), "
          "so fwd+bwd costs about one extra forward.")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="(c) ring overhead on one GPU")
    args = parser.parse_args()
    print(f"# ring attention bench — jax {jax.__version__}, {jax.devices()[0].platform}, "
          f"{jax.device_count()} devices, {time.strftime('%Y-%m-%d')}")
    if args.gpu:
        gpu_overhead()
        return
    work_balance()
    memory()


if __name__ == "__main__":
    main()
