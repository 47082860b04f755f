"""Flash attention forward for Hopper GPUs (H100/H200) in Pallas Mosaic GPU.

FlashAttention-3 (Shah et al., 2024, https://arxiv.org/abs/2407.08608) in its simplest
form. A thread block holds two query tiles, one per *compute warpgroup* (128 threads
each), and a third *memory warpgroup* that streams key/value tiles from HBM into a ring
of shared-memory slots with TMA copies, each slot guarded by a "ready" barrier (TMA
done) and a "free" barrier (both compute warpgroups done with it). The compute
warpgroups run QKᵀ and PV as asynchronous warpgroup MMAs (wgmma) on shared-memory
operands and take turns on the tensor cores through a shared "turn" barrier, so the
softmax of one warpgroup overlaps the matmuls of the other. The Triton kernel of gpu.py
cannot express any of this (no warp specialisation, no wgmma from registers).

Only the forward pass lives here; gpu_hopper_bwd.py holds the backward, built the same
way, which needs nothing from the forward but the log-sum-exp. gpu.py routes the eligible
calls to them. Eligible means the common training case: bf16/f16, full or causal
attention with q_len == kv_len, GQA, head dim 64/128/256 (v head dim equal; the backward
takes 64/128), sequence a multiple of the tiles, segment ids or none, no window, soft-cap,
sinks or explicit positions; `unsupported_reason` says why a call is not.

Segment ids (packed documents, reference.py's rule: a query sees a key of its own segment
only) are a static switch: without them the kernel is the one above. With them the key tiles
are planned outside the kernel from each tile's min/max segment id (`segment_spans`, from
gpu_tiling.py): the thread block streams only the span of key tiles its rows may see, each
warpgroup skips the tiles of that span it does not need, and only tiles that are not wholly
inside one shared segment (or that cross the causal diagonal) apply the element-wise mask,
built from the query rows' ids (loaded once) and the key tile's ids (a TMA copy that lands
with the key tile). A query with no visible key gets o = 0 and lse = -inf, as in gpu.py.

Written after studying jax's bundled example (jax.experimental.pallas.ops.gpu.
attention_mgpu); differences: the softmax scale is applied, the log-sum-exp is in
natural units in gpu.py's [B, H, T] layout, and causal query tiles run heaviest first.
It lowers only on a Hopper GPU: its tests run compiled there
(`pytest tests/pallas_kernels/test_flash_attention_gpu.py -k hopper`).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels.flash_attention import gpu_tiling, reference

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
WGMMA_ROWS = 64  # rows of one warpgroup MMA: the query tile of each compute warpgroup
# Shared memory one H100 thread block may use (227 KiB), less 2 KiB for the barriers
# and alignment padding the compiler adds (a 229,888-byte tiling asked for 232,568).
SMEM_BYTES = 225 * 1024


@dataclasses.dataclass(frozen=True)
class HopperBlocks:
    """Tiles of the warp-specialised forward.

    block_q: query rows per compute warpgroup (a thread block covers 2 * block_q rows).
    block_kv: key/value rows per pipeline step.
    stages: key/value slots in shared memory (TMA copies in flight ahead of compute).
    """

    block_q: int = 64
    block_kv: int = 128
    stages: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_kv"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 64 or value % 64:
                raise ValueError(f"HopperBlocks.{name}={value!r} must be a positive multiple of 64")
        if not isinstance(self.stages, int) or self.stages < 2:
            raise ValueError(f"HopperBlocks.stages={self.stages!r} must be an int >= 2")

    @classmethod
    def get_default(cls, head_dim: int) -> "HopperBlocks":
        # The largest key tile whose K and V slots fit in shared memory next to Q.
        return cls(block_kv={64: 256, 128: 128}.get(head_dim, 64))

    def smem_bytes(self, head_dim: int, itemsize: int = 2, segments: bool = False) -> int:
        q_and_o = 2 * self.block_q * head_dim * itemsize
        kv = 2 * self.stages * self.block_kv * head_dim * itemsize
        ids = (2 * self.block_q + self.stages * self.block_kv) * 4 if segments else 0
        return q_and_o + kv + 2 * self.block_q * 4 + ids  # + the log-sum-exp staging rows


def unsupported_reason(q, k, v, *, blocks: HopperBlocks, segment_ids=None, **features):
    """None if `forward` takes this call, else the reason (a short string).

    segment_ids: None, one [B, T] array or a (q_seg, kv_seg) pair (taken: q_len == kv_len).
    `features` are the other flash_attention arguments (sliding_window=..., sinks=...):
    any that is set makes the call ineligible.
    """
    used = [name for name, value in features.items() if value is not None and value is not False]
    if used:
        return f"not supported by the Hopper kernel: {used}"
    b, tq, h, d = q.shape
    tk, hkv, dv = v.shape[1:]
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype} (bf16/f16 only)"
    if d not in (64, 128, 256) or dv != d:
        return f"head dims {d}/{dv} (64, 128 or 256, equal)"
    if tq != tk:
        return f"q_len {tq} != kv_len {tk}"
    if segment_ids is not None:
        shapes = [x.shape for x in reference.split_segment_ids(segment_ids, tq, tk)]
        if shapes != [(b, tq), (b, tk)]:
            return f"segment ids of shapes {shapes} (want [batch, seq])"
    if tq % (2 * blocks.block_q) or tk % blocks.block_kv:
        return f"sequence {tq} not a multiple of {2 * blocks.block_q} and {blocks.block_kv}"
    if tk < 2 * blocks.block_kv:
        return f"sequence {tk} shorter than two key tiles of {blocks.block_kv}"
    smem = blocks.smem_bytes(d, segments=segment_ids is not None)
    if smem > SMEM_BYTES:
        return f"tiles need {smem} bytes of shared memory"
    return None


def segment_spans(q_seg, kv_seg, *, causal: bool, rows: int, block: int, over: str):
    """The streamed tiles each thread block and warpgroup visits, from the segment ids.

    A thread block owns 2 x `rows` rows, one `rows` slab per compute warpgroup: query rows
    streaming key tiles of `block` (over="kv": the forward and dq kernels) or key rows
    streaming query tiles (over="q": the dk/dv kernel). gpu_tiling.block_spans bounds each
    warpgroup's tiles by their min/max segment id (and the causal diagonal).

    Returns int32 [B, T // (2 rows), 2, 6]; for warpgroup w of a block,
    (lo, own_lo, full_lo, full_hi, own_hi, hi): the block streams tiles [lo, hi) (the
    union of its warpgroups' spans); warpgroup w computes [own_lo, own_hi), without the
    element-wise mask on [full_lo, full_hi), and only takes the others off the ring. A
    warpgroup that needs no tile has own_lo = own_hi = lo.
    """
    b, t = q_seg.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    block_q, block_k = (rows, block) if over == "kv" else (block, rows)
    spans = gpu_tiling.block_spans(pos, pos, q_seg, kv_seg, causal=causal, sliding_window=None,
                                   block_q=block_q, block_k=block_k, q_len=t, kv_len=t,
                                   over=over)  # [B, T // rows, 4]
    own_lo, full_lo, full_hi, own_hi = jnp.moveaxis(spans.reshape(b, -1, 2, 4), -1, 0)
    idle = own_lo >= own_hi  # [B, blocks, 2]
    hi = jnp.max(jnp.where(idle, 0, own_hi), axis=-1, keepdims=True)
    lo = jnp.minimum(jnp.min(jnp.where(idle, t, own_lo), axis=-1, keepdims=True), hi)
    own_lo, own_hi = jnp.where(idle, lo, own_lo), jnp.where(idle, lo, own_hi)
    full_lo = jnp.clip(full_lo, own_lo, own_hi)
    full_hi = jnp.clip(full_hi, full_lo, own_hi)
    lo, hi = jnp.broadcast_to(lo, own_lo.shape), jnp.broadcast_to(hi, own_lo.shape)
    return jnp.stack([lo, own_lo, full_lo, full_hi, own_hi, hi], axis=-1).astype(jnp.int32)


def same_segment(row_seg, col_seg, shape):
    """[rows, cols] booleans in the WGMMA layout: row i and column j share a segment.

    row_seg: [rows] in WGMMA.reduce(1) (a value per row); col_seg: [cols] in
    WGMMA.reduce(0) (a value per column).
    """
    return lax.broadcast_in_dim(row_seg, shape, [0]) == lax.broadcast_in_dim(col_seg, shape, [1])


def _kernel(q_ref, k_ref, v_ref, seg_refs, o_ref, lse_ref, smem, ready, free, turn, *,
            causal: bool, scale2: float, blocks: HopperBlocks, group: int, num_q_tiles: int,
            kv_len: int):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    bq, bkv, stages = blocks.block_q, blocks.block_kv, blocks.stages
    qo_smem2, k_smem, v_smem, lse_smem2, *seg_smem = smem
    k_ready, v_ready, q_ready = ready
    k_free, v_free = free
    batch = lax.axis_index("batch")
    head = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    tile = lax.axis_index("q_seq")
    if causal:  # the last query tiles see the most keys: launch them first
        tile = num_q_tiles - 1 - tile
    # Key steps the thread block needs (the later warpgroup's count).
    if causal:
        block_kv_steps = pl.cdiv((tile + 1) * (2 * bq), jnp.array(bkv, jnp.int32))
    else:
        block_kv_steps = kv_len // bkv
    segments = bool(seg_refs)
    if segments:  # the block streams key tiles [lo, block_kv_steps) (segment_spans)
        q_seg_ref, kv_seg_ref, spans_ref = seg_refs
        q_seg_smem2, kv_seg_smem = seg_smem
        lo, block_kv_steps = spans_ref[batch, tile, 0, 0], spans_ref[batch, tile, 0, 5]

    def take_turn():  # both compute warpgroups arrive, then both go on
        plgpu.barrier_arrive(turn)
        plgpu.barrier_wait(turn)

    @pl.when(wg < 2)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        qo_smem, lse_smem = qo_smem2.at[wg], lse_smem2.at[wg]
        q_base = tile * (2 * bq) + wg * bq
        kv_steps = pl.cdiv(q_base + bq, jnp.array(bkv, jnp.int32)) if causal else block_kv_steps
        plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_base, bq), head], qo_smem, q_ready.at[wg])
        if segments:  # this warpgroup's tiles, and its rows' ids on Q's barrier (2 arrivals)
            own_lo, full_lo, full_hi, kv_steps = (spans_ref[batch, tile, wg, i] for i in range(1, 5))
            plgpu.copy_gmem_to_smem(q_seg_ref.at[batch, pl.ds(q_base, bq)], q_seg_smem2.at[wg],
                                    q_ready.at[wg])
        plgpu.barrier_wait(q_ready.at[wg])
        if segments:
            q_seg = _compat.mgpu_load(q_seg_smem2.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))

        m = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l = plgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        acc = plgpu.layout_cast(jnp.zeros((bq, q_ref.shape[-1]), jnp.float32), plgpu.Layout.WGMMA)

        def skip(j, _):
            # A tile of the block's span that only the other warpgroup needs: wait for it
            # all the same (Mosaic GPU tracks barrier phases per thread: a skipped wait would
            # leave this warpgroup's later waits on the slot one phase behind), release it,
            # and keep the turn-taking in step.
            slot = lax.rem(j, jnp.array(stages, j.dtype))
            plgpu.barrier_wait(k_ready.at[slot])
            plgpu.barrier_arrive(k_free.at[slot])
            take_turn()
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
            take_turn()

        if segments:
            lax.fori_loop(lo, own_lo, skip, None)

            @pl.when(kv_steps > own_lo)
            def _():
                plgpu.barrier_wait(k_ready.at[lax.rem(own_lo, jnp.array(stages, own_lo.dtype))])
        else:
            @pl.when(kv_steps > 0)
            def _():
                plgpu.barrier_wait(k_ready.at[0])

        pl.when(wg == 1)(take_turn)  # offset the two warpgroups by half a step

        def step(j, carry, masked: bool):
            acc, m, l = carry
            slot = lax.rem(j, jnp.array(stages, j.dtype))

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, qo_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                take_turn()
                return acc_ref[...]

            def qk_and_ids(acc_ref):  # the tile's ids, read while QK runs (before the slot
                plgpu.wgmma(acc_ref, qo_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                ids = _compat.mgpu_load(kv_seg_smem.at[slot],  # is released)
                                        layout=plgpu.Layout.WGMMA.reduce(0))
                take_turn()
                return acc_ref[...], ids

            if masked and segments:
                s, kv_seg = pl.run_scoped(qk_and_ids, plgpu.ACC((bq, bkv), jnp.float32))
            else:
                s = pl.run_scoped(qk, plgpu.ACC((bq, bkv), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            if masked and segments:
                keep = same_segment(q_seg, kv_seg, s.shape)
                if causal:
                    rows = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
                    cols = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
                    keep &= rows + q_base >= cols + j * bkv
                s = jnp.where(keep, s, -jnp.inf)
            elif masked:
                rows = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 0, layout=plgpu.Layout.WGMMA)
                cols = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 1, layout=plgpu.Layout.WGMMA)
                s = jnp.where(rows + q_base >= cols + j * bkv, s, -jnp.inf)
            # Base-2 online softmax; m is kept in scaled units so p is one FMA + exp2.
            m_new = jnp.maximum(m, s.max(axis=1) * scale2)
            if masked and segments:  # a row with no key kept so far keeps m = -inf:
                m_sub = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # subtract 0 there, not -inf
            else:
                m_sub = m_new
            alpha = jnp.exp2(m - m_sub)
            p = jnp.exp2(s * scale2 - lax.broadcast_in_dim(m_sub, s.shape, [0]))
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            l = l * alpha
            p16 = p.astype(q_ref.dtype)

            def release_turn():  # softmax done: let the other warpgroup's QK run
                plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_wait(turn)

            # The order of the row sum and the barrier matters for speed (jax's example
            # measured it); keep theirs.
            if q_ref.shape[-1] <= 128:
                l = l + p.sum(axis=1)
                acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
                release_turn()
            else:
                release_turn()
                l = l + p.sum(axis=1)

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                nxt = j + 1

                @pl.when(nxt < kv_steps)
                def _():
                    plgpu.barrier_wait(k_ready.at[lax.rem(nxt, jnp.array(stages, j.dtype))])

            acc = pl.run_state(pv)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l

        carry = (acc, m, l)

        def drain(j, _):
            slot = lax.rem(j, jnp.array(stages, j.dtype))
            plgpu.barrier_arrive(k_free.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
            take_turn()
            take_turn()

        if segments:  # masked, unmasked (whole tiles of one shared segment), masked, then
            # release the tiles only the other warpgroup still needs
            carry = lax.fori_loop(own_lo, full_lo, functools.partial(step, masked=True), carry)
            carry = lax.fori_loop(full_lo, full_hi, functools.partial(step, masked=False), carry)
            acc, m, l = lax.fori_loop(full_hi, kv_steps, functools.partial(step, masked=True),
                                      carry)
            lax.fori_loop(kv_steps, block_kv_steps, drain, None)
        elif not causal:
            acc, m, l = lax.fori_loop(0, kv_steps, functools.partial(step, masked=False), carry)
        else:
            # Key tiles wholly below the diagonal need no mask; then the diagonal ones;
            # then release the slots the other (later) warpgroup still streams.
            unmasked = lax.div(q_base, jnp.array(bkv, jnp.int32))
            carry = lax.fori_loop(0, unmasked, functools.partial(step, masked=False), carry)
            acc, m, l = lax.fori_loop(unmasked, kv_steps, functools.partial(step, masked=True),
                                      carry)
            lax.fori_loop(kv_steps, block_kv_steps, drain, None)
        pl.when(wg == 0)(take_turn)

        if segments:  # a query row that saw no key (its segment has none): o = 0, lse = -inf
            seen = l > 0.0
            l_safe = jnp.where(seen, l, 1.0)
            qo_smem[...] = (acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])).astype(q_ref.dtype)
            lse_smem[...] = jnp.where(seen, (m + jnp.log2(l_safe)) * LN2, -jnp.inf)
        else:
            qo_smem[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(q_ref.dtype)
            lse_smem[...] = (m + jnp.log2(l)) * LN2  # natural units, like gpu.py's kernel
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[batch, pl.ds(q_base, bq), head])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, head, pl.ds(q_base, bq)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(head, jnp.array(group, head.dtype))

        def load(j, slot):
            rows = (batch, pl.ds(j * bkv, bkv), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_ready.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_ready.at[slot])

        def load_k_and_ids(j, slot):  # the tile's segment ids land on K's barrier (2 arrivals)
            plgpu.copy_gmem_to_smem(k_ref.at[batch, pl.ds(j * bkv, bkv), kv_head],
                                    k_smem.at[slot], k_ready.at[slot])
            plgpu.copy_gmem_to_smem(kv_seg_ref.at[batch, pl.ds(j * bkv, bkv)],
                                    kv_seg_smem.at[slot], k_ready.at[slot])

        def load_v(j, slot):
            plgpu.copy_gmem_to_smem(v_ref.at[batch, pl.ds(j * bkv, bkv), kv_head],
                                    v_smem.at[slot], v_ready.at[slot])

        def fill(j):
            slot = lax.rem(j, jnp.array(stages, j.dtype))
            load_k_and_ids(j, slot)
            load_v(j, slot)

        if segments:  # step j in slot j % stages, from the block's first tile `lo` on
            for i in range(stages):
                pl.when(lo + i < block_kv_steps)(functools.partial(fill, lo + i))

            @pl.loop(lo, block_kv_steps - stages)
            def _(j):
                slot = lax.rem(j, jnp.array(stages, j.dtype))
                plgpu.barrier_wait(k_free.at[slot])
                load_k_and_ids(j + stages, slot)
                plgpu.barrier_wait(v_free.at[slot])
                load_v(j + stages, slot)
            return

        for slot in range(stages):  # fill the ring, with no more tiles than the block needs
            pl.when(slot < block_kv_steps)(functools.partial(load, slot, slot))

        @pl.loop(0, block_kv_steps - stages)
        def _(j):  # refill the slot of step j with step j + stages once both are done
            slot = lax.rem(j, jnp.array(stages, j.dtype))
            plgpu.barrier_wait(k_free.at[slot])
            rows = (batch, pl.ds((j + stages) * bkv, bkv), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_ready.at[slot])
            plgpu.barrier_wait(v_free.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_ready.at[slot])


def forward(q, k, v, *, causal: bool, sm_scale: float, blocks: HopperBlocks | None = None,
            segment_ids=None):
    """(o [B, T, H, D], lse [B, H, T] f32, natural log) of softmax(sm_scale q kᵀ) v.

    segment_ids: None, a [B, T] int array, or a (q_seg, kv_seg) pair: a query sees only
    the keys of its own segment (reference.py); one that sees none gets o = 0, lse = -inf.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    b, t, h, d = q.shape
    hkv = k.shape[2]
    blocks = blocks or HopperBlocks.get_default(d)
    reason = unsupported_reason(q, k, v, blocks=blocks, segment_ids=segment_ids)
    if reason:
        raise ValueError(f"gpu_hopper.forward: {reason}")
    bq, bkv = blocks.block_q, blocks.block_kv
    blocks = dataclasses.replace(blocks, stages=min(blocks.stages, t // bkv))
    num_q_tiles = t // (2 * bq)
    segments = segment_ids is not None
    seg_args = ()
    if segments:
        q_seg, kv_seg = (x.astype(jnp.int32) for x in reference.split_segment_ids(segment_ids, t, t))
        seg_args = (q_seg, kv_seg,
                    segment_spans(q_seg, kv_seg, causal=causal, rows=bq, block=bkv, over="kv"))
    # 128-byte swizzled tiles of 8 x 64 elements: the shared-memory layout wgmma reads.
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    kernel = functools.partial(
        _kernel, causal=causal, scale2=float(sm_scale) * LOG2E, blocks=blocks, group=h // hkv,
        num_q_tiles=num_q_tiles, kv_len=t)

    def entry(q_ref, k_ref, v_ref, *refs):
        *seg_refs, o_ref, lse_ref = refs  # seg_refs: q_seg, kv_seg, spans, with segments
        smem = (plgpu.SMEM((2, bq, d), q.dtype, transforms=transforms),
                plgpu.SMEM((blocks.stages, bkv, d), q.dtype, transforms=transforms),
                plgpu.SMEM((blocks.stages, bkv, d), q.dtype, transforms=transforms),
                plgpu.SMEM((2, bq), jnp.float32))
        arrivals = 1  # TMA copies per Q and K barrier phase
        if segments:  # the rows' ids per warpgroup, a key tile's ids per ring slot
            smem += (plgpu.SMEM((2, bq), jnp.int32), plgpu.SMEM((blocks.stages, bkv), jnp.int32))
            arrivals = 2
        ready = (plgpu.Barrier(num_arrivals=arrivals, num_barriers=blocks.stages),
                 plgpu.Barrier(num_barriers=blocks.stages),
                 plgpu.Barrier(num_arrivals=arrivals, num_barriers=2))
        free = (plgpu.Barrier(num_arrivals=2, num_barriers=blocks.stages),) * 2
        turn = plgpu.Barrier(num_arrivals=2)
        pl.run_scoped(
            lambda *scoped: kernel(q_ref, k_ref, v_ref, tuple(seg_refs), o_ref, lse_ref, *scoped),
            smem, ready, free, turn, collective_axes="wg")

    name = (f"flash_fwd_hopper_bq{bq}_bkv{bkv}{'_causal' if causal else ''}"
            f"{'_segments' if segments else ''}")
    with jax.named_scope(name):
        return plgpu.kernel(
            entry,
            out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                      jax.ShapeDtypeStruct((b, h, t), jnp.float32)),
            grid=(h, num_q_tiles, b),
            grid_names=("heads", "q_seq", "batch"),
            num_threads=3,
            thread_name="wg",
            kernel_name=name,  # the name profiles show (default: "entry")
            compiler_params=plgpu.CompilerParams(approx_math=True),
        )(q, k, v, *seg_args)
