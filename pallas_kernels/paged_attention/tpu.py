"""Paged decode attention in Pallas for TPUs: scalar-prefetched page table, manual DMA.

Same algorithm as gpu.py (PagedAttention, Kwon et al., 2023,
https://arxiv.org/abs/2309.06180, with a FlashAttention online softmax), shaped for
the TPU's pipeline:

  * `lengths` and the page table are scalar-prefetched into SMEM, so the kernel can
    compute page addresses before any vector work;
  * grid (batch, kv_head, block): the G query heads of a kv head form the rows of one
    [G, D] x [D, block_k] matmul, so each page is read once per group (no K/V repeat);
  * K/V stay in HBM (`memory_space=ANY`); each step DMAs `pages_per_block` pages into
    a VMEM double buffer, starting the copy of block i+1 before computing block i;
  * blocks outside the visible keys (past `lengths[b]`, before the sliding window)
    issue no DMA and no compute; the running max / sum / accumulator live in VMEM
    scratch across the block axis and the output is written at the last block.

On CPU, `interpret=pltpu.InterpretParams()` runs it (slowly) for tests.

    >>> import jax.numpy as jnp
    >>> from jax.experimental.pallas import tpu as pltpu
    >>> q = jnp.ones((1, 4, 16)); kp = vp = jnp.ones((2, 4, 8, 16))
    >>> o = paged_attention_tpu(q, kp, vp, jnp.array([13], jnp.int32),
    ...                         jnp.array([[3, 1]], jnp.int32),
    ...                         interpret=pltpu.InterpretParams())
    >>> o.shape
    (1, 4, 16)
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the TPU kernel: pages DMA'd and computed per grid step."""

    pages_per_block: int = 8

    def __post_init__(self):
        if self.pages_per_block < 1:
            raise ValueError(f"{self.pages_per_block=} must be >= 1")

    @classmethod
    def get_default(cls, *, page_size: int, max_pages: int) -> "BlockSizes":
        """~512 keys per step amortises the ~0.35 us per-step overhead."""
        return cls(pages_per_block=max(1, min(max_pages, 512 // page_size)))


def _kernel(
    # scalar prefetch (SMEM)
    lengths_ref,  # [B] int32
    table_ref,  # [B * max_pages] int32, max_pages a multiple of pages_per_block
    # inputs
    q_ref,  # [G, D] (VMEM block)
    k_hbm,  # [Hkv, num_pages, page_size, D] (HBM)
    v_hbm,
    # outputs
    o_ref,  # [G, D]
    # scratch
    k_buf,  # [2, ppb, page_size, D] VMEM double buffer
    v_buf,
    sems,  # DMA semaphores [2 (k/v), 2 (slot)]
    m_ref,  # [G, 1] f32 running max
    l_ref,  # [G, 1] f32 running sum
    acc_ref,  # [G, D] f32 running numerator
    *,
    sm_scale: float,
    logit_soft_cap: float | None,
    sliding_window: int | None,
    pages_per_block: int,
    max_pages: int,
):
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    num_steps = pl.num_programs(2)
    _, _, page_size, d = k_hbm.shape
    block_k = pages_per_block * page_size
    length = lengths_ref[b]

    # Blocks [first, last) hold visible keys.
    last = pl.cdiv(length, block_k)
    first = 0
    if sliding_window is not None:
        # lax.div: truncating division of a non-negative value, no sign op to lower
        first = lax.div(jnp.maximum(length - sliding_window, 0), block_k)

    def copies(block, slot):
        """DMA descriptors of the K and V pages of `block` into buffer `slot`."""
        out = []
        for p in range(pages_per_block):  # static unroll: one DMA per page and tensor
            page = table_ref[b * max_pages + block * pages_per_block + p]
            out.append(pltpu.make_async_copy(k_hbm.at[h, page], k_buf.at[slot, p], sems.at[0, slot]))
            out.append(pltpu.make_async_copy(v_hbm.at[h, page], v_buf.at[slot, p], sems.at[1, slot]))
        return out

    @pl.when(i == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    active = (i >= first) & (i < last)

    @pl.when(active & (i == first))
    def _prime():  # the first visible block fetches itself; later ones were prefetched
        for c in copies(i, i % 2):
            c.start()

    @pl.when(active)
    def _compute():
        @pl.when(i + 1 < last)
        def _prefetch():
            for c in copies(i + 1, (i + 1) % 2):
                c.start()

        slot = i % 2
        for c in copies(i, slot):
            c.wait()
        k = k_buf[slot].reshape(block_k, d)  # [block_k, D]
        v = v_buf[slot].reshape(block_k, d)
        q = q_ref[...]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * sm_scale  # [G, block_k]
        if logit_soft_cap is not None:
            s = logit_soft_cap * jnp.tanh(s / logit_soft_cap)
        pos = i * block_k + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        mask = pos < length
        if sliding_window is not None:
            mask &= pos >= length - sliding_window
        s = jnp.where(mask, s, -jnp.inf)
        m_prev = m_ref[...]
        # Every visited block holds a visible key, so m_new is finite; guard anyway.
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        m_new = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new)
        l_ref[...] = alpha * l_ref[...] + p.sum(axis=1, keepdims=True)
        m_ref[...] = m_new
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
        acc_ref[...] = alpha * acc_ref[...] + pv

    @pl.when(i == num_steps - 1)
    def _finish():
        l = l_ref[...]
        o_ref[...] = (acc_ref[...] / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "logit_soft_cap", "sliding_window", "block_sizes",
                     "interpret", "debug"),
)
def paged_attention_tpu(
    q,
    k_pages,
    v_pages,
    lengths,
    page_table,
    *,
    sm_scale: float | None = None,
    logit_soft_cap: float | None = None,
    sliding_window: int | None = None,
    block_sizes: BlockSizes | None = None,
    interpret=False,
    debug: bool = False,
):
    """Paged decode attention; arguments as in `reference.paged_attention_reference`."""
    b, h, d = q.shape
    hkv, num_pages, page_size, _ = k_pages.shape
    g = h // hkv
    max_pages = page_table.shape[1]
    if block_sizes is None:
        block_sizes = BlockSizes.get_default(page_size=page_size, max_pages=max_pages)
    if sm_scale is None:
        sm_scale = d**-0.5
    ppb = min(block_sizes.pages_per_block, max_pages)
    num_steps = pl.cdiv(max_pages, ppb)
    padded_pages = num_steps * ppb
    # Every table entry must be a loadable page; entries past a sequence are masked.
    table = jnp.clip(page_table.astype(jnp.int32), 0, num_pages - 1)
    table = jnp.pad(table, ((0, 0), (0, padded_pages - max_pages))).reshape(-1)
    qg = q.reshape(b, hkv, g, d)  # [B, Hkv, G, D]: heads of a group are contiguous

    kernel = functools.partial(
        _kernel, sm_scale=sm_scale, logit_soft_cap=logit_soft_cap,
        sliding_window=sliding_window, pages_per_block=ppb, max_pages=padded_pages)
    name = f"paged_attention_tpu_ppb{ppb}"
    q_spec = pl.BlockSpec((None, None, g, d), lambda i, j, s, *_: (i, j, 0, 0))
    with jax.named_scope(name):
        o = pl.pallas_call(
            kernel,
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=2,
                grid=(b, hkv, num_steps),
                in_specs=[q_spec, pl.BlockSpec(memory_space=pl.ANY),
                          pl.BlockSpec(memory_space=pl.ANY)],
                out_specs=q_spec,
                scratch_shapes=[
                    pltpu.VMEM((2, ppb, page_size, d), k_pages.dtype),
                    pltpu.VMEM((2, ppb, page_size, d), v_pages.dtype),
                    pltpu.SemaphoreType.DMA((2, 2)),
                    pltpu.VMEM((g, 1), jnp.float32),
                    pltpu.VMEM((g, 1), jnp.float32),
                    pltpu.VMEM((g, d), jnp.float32),
                ],
            ),
            out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "arbitrary")),
            interpret=interpret,
            debug=debug,
            name=name,
            cost_estimate=pl.CostEstimate(
                flops=4 * b * h * max_pages * page_size * d,
                transcendentals=b * h * max_pages * page_size,
                bytes_accessed=2 * b * hkv * max_pages * page_size * d * k_pages.dtype.itemsize,
            ),
        )(lengths.astype(jnp.int32), table, qg, k_pages, v_pages)
    return o.reshape(b, h, d)
