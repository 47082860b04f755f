"""Paged decode attention for Hopper GPUs (H100/H200) in Pallas Mosaic GPU.

The Triton kernel of gpu.py gathers a block of pages with one pointer load per element
and leaves the overlap of loads and compute to Triton's software pipeliner; on an H200
it reaches ~75% of copy bandwidth (bench/results/decode.md). Here each thread block
has a *memory warpgroup* that streams pages from HBM into a ring of shared-memory slots
with TMA copies (one bulk copy per page, its index read from the page table), as many
slots ahead as fit, and a *compute warpgroup* that runs the online softmax over each
slot as it lands, with warpgroup MMAs (wgmma). The split-K layout is gpu.py's: one
thread block per (split, kv head, sequence), each writing its normalised partial output
and log-sum-exp, merged by `gpu.merge_splits`.

The G = H / kv_heads query heads of a kv head are the rows of the matmuls, zero-padded
to the 64 rows of a wgmma: decode does ~1 FLOP per byte, so the idle rows cost tensor
core time that is free while the kernel waits on memory, and each K/V page is read once
for the whole group.

It lowers only on a Hopper GPU (no interpret mode); gpu.py routes eligible calls to it
(`unsupported_reason` says which) and its tests run compiled there.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
WGMMA_ROWS = 64  # rows of one warpgroup MMA: the padded query-head group
# Shared memory a thread block may use on Hopper (227 KiB), less 3 KiB for the barriers
# and alignment padding the compiler adds (a 229,632-byte tiling asked for 232,520).
SMEM_BYTES = 224 * 1024


@dataclasses.dataclass(frozen=True)
class HopperPagedBlocks:
    """Tiling of the Mosaic GPU paged kernel.

    block_k: keys per pipeline step (a whole number of pages, a multiple of 64).
    stages: shared-memory slots of K and V (TMA copies in flight ahead of compute).
    num_splits: split-K factor over the page table (None: gpu.default_num_splits).
    """

    block_k: int = 64
    stages: int = 2  # measured best on an H200 (bench/results/decode.md): two blocks fit an SM
    num_splits: int | None = None

    def __post_init__(self):
        if not isinstance(self.block_k, int) or self.block_k < 64 or self.block_k % 64:
            raise ValueError(f"HopperPagedBlocks.block_k={self.block_k!r} must be a positive multiple of 64")
        if not isinstance(self.stages, int) or self.stages < 2:
            raise ValueError(f"HopperPagedBlocks.stages={self.stages!r} must be an int >= 2")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"HopperPagedBlocks.num_splits={self.num_splits!r} must be >= 1 or None")

    def smem_bytes(self, head_dim: int, itemsize: int = 2) -> int:
        q = WGMMA_ROWS * head_dim * itemsize
        kv = 2 * self.stages * self.block_k * head_dim * itemsize
        out = WGMMA_ROWS * head_dim * 4 + WGMMA_ROWS * 4  # f32 output and lse staging
        return q + max(kv, out)  # the output reuses the K/V ring's memory


def unsupported_reason(q, k_pages, *, blocks: HopperPagedBlocks, logit_soft_cap=None) -> str | None:
    """None if `partial_attention` takes this call, else the reason (a short string)."""
    _, h, d = q.shape
    hkv, _, page_size, _ = k_pages.shape
    if logit_soft_cap is not None:
        return "logit_soft_cap (tanh is not lowered here)"
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k_pages.dtype != q.dtype:
        return f"dtype {q.dtype}/{k_pages.dtype} (bf16/f16 only)"
    if d not in (64, 128, 256):
        return f"head_dim {d} (64, 128 or 256)"
    if h // hkv > WGMMA_ROWS:
        return f"{h // hkv} query heads per kv head (at most {WGMMA_ROWS})"
    if page_size % 8 or blocks.block_k % page_size:
        return f"page_size {page_size} (a multiple of 8 dividing block_k={blocks.block_k})"
    if blocks.smem_bytes(d) > SMEM_BYTES:
        return f"tiles need {blocks.smem_bytes(d)} bytes of shared memory"
    return None


def _kernel(len_ref, pt_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, smem, ready, free, *,
            scale2: float, sliding_window: int | None, pages_per_block: int,
            pages_per_split: int, stages: int, group: int):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    q_smem, ((k_smem, v_smem), (o_smem, lse_smem)) = smem
    k_ready, v_ready, q_ready = ready
    k_free, v_free = free
    split = lax.axis_index("split")
    head = lax.axis_index("head")
    seq = lax.axis_index("seq")
    wg = lax.axis_index("wg")
    page_size = k_ref.shape[2]
    max_pages = pt_ref.shape[1]
    block_k = pages_per_block * page_size
    length = len_ref[seq]

    # Pages [lo, hi) of this split hold visible keys (as in gpu.py's kernel): blocks start
    # at the split's first page, or at the window's first page aligned down to a block.
    split_lo = split * pages_per_split
    hi = jnp.minimum(split_lo + pages_per_split, lax.div(length + page_size - 1, page_size))
    lo = split_lo
    if sliding_window is not None:
        first = lax.div(jnp.maximum(length - sliding_window, 0), page_size)
        lo = jnp.maximum(lo, split_lo + lax.div(first - split_lo, pages_per_block) * pages_per_block)
    num_blocks = lax.div(jnp.maximum(hi - lo, 0) + pages_per_block - 1, pages_per_block)

    @pl.when(wg == 0)
    def _compute():
        plgpu.copy_gmem_to_smem(q_ref.at[seq, head], q_smem, q_ready)
        plgpu.barrier_wait(q_ready)
        layout = plgpu.Layout.WGMMA
        m = plgpu.layout_cast(jnp.full((WGMMA_ROWS,), -jnp.inf, jnp.float32), layout.reduce(1))
        l = plgpu.layout_cast(jnp.full((WGMMA_ROWS,), 0.0, jnp.float32), layout.reduce(1))
        acc = plgpu.layout_cast(jnp.zeros((WGMMA_ROWS, q_ref.shape[-1]), jnp.float32), layout)

        def step(j, carry):
            acc, m, l = carry
            slot = lax.rem(j, jnp.array(stages, j.dtype))
            plgpu.barrier_wait(k_ready.at[slot])

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                return acc_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((WGMMA_ROWS, block_k), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            pos = (lo + j * pages_per_block) * page_size + plgpu.broadcasted_iota(
                jnp.int32, (WGMMA_ROWS, block_k), 1, layout=layout)
            visible = pos < length
            if sliding_window is not None:
                visible &= pos >= length - sliding_window
            s = jnp.where(visible, s * scale2, -jnp.inf)
            # Every visited block holds a visible key, so m_new is finite.
            m_new = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            l = l * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            p16 = p.astype(k_smem.dtype)
            plgpu.barrier_wait(v_ready.at[slot])

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

            acc = pl.run_state(pv)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l

        acc, m, l = lax.fori_loop(0, num_blocks, step, (acc, m, l))
        seen = l > 0
        l_safe = jnp.where(seen, l, 1.0)
        o_smem[...] = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
        lse_smem[...] = jnp.where(seen, m * LN2 + jnp.log(l_safe), -jnp.inf)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, group)], o_ref.at[split, seq, head])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[split, seq, head])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 1)
    def _memory():
        def pages_of(j):  # page indices of block j (columns past the table read its last)
            first = lo + j * pages_per_block
            return [pt_ref[seq, jnp.minimum(first + p, max_pages - 1)] for p in range(pages_per_block)]

        def load(src, dst, barrier, pages):
            for p, page in enumerate(pages):
                plgpu.copy_gmem_to_smem(src.at[head, page], dst.at[pl.ds(p * page_size, page_size)],
                                        barrier)

        def fill(slot):
            pages = pages_of(slot)
            load(k_ref, k_smem.at[slot], k_ready.at[slot], pages)
            load(v_ref, v_smem.at[slot], v_ready.at[slot], pages)

        for slot in range(stages):  # fill the ring, with no more blocks than the split has
            pl.when(slot < num_blocks)(functools.partial(fill, slot))

        @pl.loop(0, jnp.maximum(num_blocks - stages, 0))
        def _(j):  # refill the slot of block j with block j + stages once it is consumed
            slot = lax.rem(j, jnp.array(stages, j.dtype))
            pages = pages_of(j + stages)  # read the table while the slot is still in use
            plgpu.barrier_wait(k_free.at[slot])
            load(k_ref, k_smem.at[slot], k_ready.at[slot], pages)
            plgpu.barrier_wait(v_free.at[slot])
            load(v_ref, v_smem.at[slot], v_ready.at[slot], pages)


def partial_attention(q, k_pages, v_pages, lengths, page_table, *, group: int, sm_scale: float,
                      sliding_window: int | None, num_splits: int, blocks: HopperPagedBlocks):
    """Per-split attention in gpu.py's layout.

    Args:
      q: [B, kv_heads, 64, D]: each kv head's `group` query heads, zero-padded to 64 rows.
      k_pages, v_pages: [kv_heads, num_pages, page_size, D].
      lengths: [B] int32; page_table: [B, max_pages] int32, every entry a valid page.
      num_splits: splits of the page table wanted; each covers a whole number of blocks.
    Returns:
      (o [S, B, kv_heads, group, D] f32, normalised per split; lse [S, B, kv_heads, 64]
      f32, natural log, -inf where a split saw no key, rows >= group are padding).
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    b, hkv, _, d = q.shape
    page_size = k_pages.shape[2]
    max_pages = page_table.shape[1]
    ppb = blocks.block_k // page_size
    num_blocks = pl.cdiv(max_pages, ppb)
    pages_per_split = pl.cdiv(num_blocks, num_splits) * ppb
    splits = pl.cdiv(max_pages, pages_per_split)
    stages = max(2, min(blocks.stages, pages_per_split // ppb))
    # 128-byte swizzled tiles of 8 x 64 elements: the shared-memory layout wgmma reads.
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    kernel = functools.partial(
        _kernel, scale2=float(sm_scale) * LOG2E, sliding_window=sliding_window,
        pages_per_block=ppb, pages_per_split=pages_per_split, stages=stages, group=group)

    def entry(len_ref, pt_ref, q_ref, k_ref, v_ref, o_ref, lse_ref):
        # The output is staged in the K/V ring's memory: every page copy issued has
        # landed and been consumed by the time the compute warpgroup writes it.
        ring = (plgpu.SMEM((stages, blocks.block_k, d), q.dtype, transforms=transforms),
                plgpu.SMEM((stages, blocks.block_k, d), q.dtype, transforms=transforms))
        out = (plgpu.SMEM((WGMMA_ROWS, d), jnp.float32), plgpu.SMEM((WGMMA_ROWS,), jnp.float32))
        smem = (plgpu.SMEM((WGMMA_ROWS, d), q.dtype, transforms=transforms),
                plgpu.RefUnion(ring, out))
        # A slot is ready once all its pages landed: one arrival per page copy.
        ready = (plgpu.Barrier(num_arrivals=ppb, num_barriers=stages),
                 plgpu.Barrier(num_arrivals=ppb, num_barriers=stages),
                 plgpu.Barrier())
        free = (plgpu.Barrier(num_barriers=stages),) * 2
        pl.run_scoped(
            lambda *scoped: kernel(len_ref, pt_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *scoped),
            smem, ready, free, collective_axes="wg")

    name = f"paged_attention_hopper_bk{blocks.block_k}_st{stages}_splits{splits}"
    with jax.named_scope(name):
        return plgpu.kernel(
            entry,
            out_type=(jax.ShapeDtypeStruct((splits, b, hkv, group, d), jnp.float32),
                      jax.ShapeDtypeStruct((splits, b, hkv, WGMMA_ROWS), jnp.float32)),
            grid=(splits, hkv, b),
            grid_names=("split", "head", "seq"),
            num_threads=2,
            thread_name="wg",
            kernel_name=name,  # the name profiles show (default: "entry")
            compiler_params=plgpu.CompilerParams(approx_math=True),
        )(lengths, page_table, q, k_pages, v_pages)
