"""Flash attention backward for Hopper GPUs (H100/H200) in Pallas Mosaic GPU.

The companion of gpu_hopper.py's forward, built the same way: a thread block has two
*compute warpgroups* (128 threads each, 64 rows each) and a *memory warpgroup* that
streams tiles from HBM into a ring of shared-memory slots with TMA copies ("ready"
barriers: copy landed; "free" barriers: both compute warpgroups are done with the slot).
Every matmul is an asynchronous warpgroup MMA (wgmma). Two kernels, as in gpu.py's
split backward (7 matmuls per tile pair, no atomics, deterministic):

- dq: a thread block holds 2 x 64 query rows (q, dO, lse, delta stay in shared memory)
  and streams K/V tiles: s = q kᵀ, dp = dO vᵀ, ds = p (dp - delta), dq += ds k.
- dk/dv: a thread block holds 2 x 64 key rows (k, v stay) and streams Q/dO tiles with
  their lse and delta, for every query head of its kv head in turn (GQA: dk and dv are
  summed in registers, K/V are never repeated): sᵀ = k qᵀ, dv += pᵀ dO,
  dpᵀ = v dOᵀ, dk += dsᵀ q.

Causal calls skip the key tiles above the diagonal (dq) and the query tiles before it
(dk/dv); only the tiles that cross the diagonal apply the element-wise mask. Heaviest
thread blocks launch first. Eligible calls are gpu_hopper.py's with head dim 64 or
128 (at 256 the dk and dv accumulators alone would fill the registers).

With segment ids (a static switch, as in the forward) both kernels stream only the tiles
of gpu_hopper.segment_spans: a thread block the span its rows may see, a warpgroup computes
its own part of it and only waits on and releases the rest; tiles not wholly inside one
shared segment apply the element-wise mask from the resident rows' ids (loaded once) and
the streamed tile's ids (a TMA copy beside the tile). Query rows that saw no key
(lse = -inf) get p = 0 everywhere, so zero gradients, as in gpu.py.

Written after jax's bundled example (jax.experimental.pallas.ops.gpu.attention_mgpu,
which has a non-causal backward only and sums GQA dk/dv per query head outside).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels.flash_attention import gpu_hopper, reference

ROWS = gpu_hopper.WGMMA_ROWS  # rows each compute warpgroup owns (64)


@dataclasses.dataclass(frozen=True)
class HopperBackwardBlocks:
    """Tiles of the Hopper backward.

    block_kv_dq: key rows per streamed tile of the dq kernel.
    block_q_dkv: query rows per streamed tile of the dk/dv kernel.
    stages: shared-memory slots of each kernel's ring.
    """

    block_kv_dq: int = 64
    block_q_dkv: int = 64
    stages: int = 2

    def __post_init__(self):
        for name in ("block_kv_dq", "block_q_dkv"):
            value = getattr(self, name)
            if value not in (64, 128):
                raise ValueError(f"HopperBackwardBlocks.{name}={value!r} must be 64 or 128")
        if not isinstance(self.stages, int) or self.stages < 2:
            raise ValueError(f"HopperBackwardBlocks.stages={self.stages!r} must be an int >= 2")

    def smem_bytes(self, head_dim: int, itemsize: int = 2, segments: bool = False) -> int:
        """The larger of the two kernels' shared memory."""
        resident = 2 * 2 * ROWS * head_dim * itemsize  # 2 warpgroups x (q, dO) or (k, v)
        dq_ring = self.stages * 2 * self.block_kv_dq * head_dim * itemsize
        dkv_ring = self.stages * (2 * self.block_q_dkv * head_dim * itemsize
                                  + 2 * self.block_q_dkv * 4)
        if segments:  # int32 ids: the resident rows', and one streamed tile's per slot
            resident += 2 * ROWS * 4
            dq_ring += self.stages * self.block_kv_dq * 4
            dkv_ring += self.stages * self.block_q_dkv * 4
        return resident + 2 * 2 * ROWS * 4 + max(dq_ring, dkv_ring)


def unsupported_reason(q, k, v, *, blocks: HopperBackwardBlocks, segment_ids=None,
                       **features):
    """None if `backward` takes this call, else the reason (a short string)."""
    reason = gpu_hopper.unsupported_reason(
        q, k, v, blocks=gpu_hopper.HopperBlocks(block_kv=blocks.block_kv_dq),
        segment_ids=segment_ids, **features)
    if reason:
        return reason
    t, d = q.shape[1], q.shape[3]
    if d not in (64, 128):
        return f"head dim {d} (the backward takes 64 or 128)"
    if t % blocks.block_q_dkv or t % (2 * ROWS):
        return f"sequence {t} not a multiple of {blocks.block_q_dkv} and {2 * ROWS}"
    smem = blocks.smem_bytes(d, segments=segment_ids is not None)
    if smem > gpu_hopper.SMEM_BYTES:
        return f"tiles need {smem} bytes of shared memory"
    return None


def _stream(load, wait_free, steps, stages: int, lo=None):
    """Memory warpgroup: load(step, slot) for every step through a ring of slots.

    Steps run from 0, or from `lo` (traced) with step j in slot j % stages.
    """
    if lo is None:
        for slot in range(stages):
            pl.when(slot < steps)(functools.partial(load, slot, slot))
        lo = 0
    else:
        for i in range(stages):
            j = lo + i
            pl.when(j < steps)(functools.partial(load, j, lax.rem(j, jnp.array(stages, j.dtype))))

    @pl.loop(lo, steps - stages)
    def _(j):  # refill the slot of step j with step j + stages once it is free
        slot = lax.rem(j, jnp.array(stages, j.dtype))
        wait_free(slot)
        load(j + stages, slot)


def _zeros(shape):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_refs, dq_ref, smem, bars,
               *, causal: bool, scale2: float, sm_scale: float, bkv: int, stages: int,
               group: int, num_q_tiles: int, kv_len: int):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    q_smem2, do_smem2, lse_smem2, delta_smem2, k_smem, v_smem, *seg_smem = smem
    own_ready, k_ready, v_ready, k_free, v_free = bars
    batch, head = lax.axis_index("batch"), lax.axis_index("heads")
    wg = lax.axis_index("wg")
    tile = lax.axis_index("q_seq")
    if causal:  # the last query tiles see the most keys: launch them first
        tile = num_q_tiles - 1 - tile
    block_steps = (pl.cdiv((tile + 1) * (2 * ROWS), jnp.array(bkv, jnp.int32)) if causal
                   else kv_len // bkv)
    segments = bool(seg_refs)
    if segments:  # the block streams key tiles [lo, block_steps) (gpu_hopper.segment_spans)
        q_seg_ref, kv_seg_ref, spans_ref = seg_refs
        q_seg_smem2, kv_seg_smem = seg_smem
        lo, block_steps = spans_ref[batch, tile, 0, 0], spans_ref[batch, tile, 0, 5]

    @pl.when(wg < 2)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
        q_base = tile * (2 * ROWS) + wg * ROWS
        rows = (batch, pl.ds(q_base, ROWS), head)
        stats = (batch, head, pl.ds(q_base, ROWS))
        plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem, own_ready.at[4 * wg])
        plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem, own_ready.at[4 * wg + 1])
        plgpu.copy_gmem_to_smem(lse_ref.at[stats], lse_smem2.at[wg], own_ready.at[4 * wg + 2])
        plgpu.copy_gmem_to_smem(delta_ref.at[stats], delta_smem2.at[wg],
                                own_ready.at[4 * wg + 3])
        if segments:
            plgpu.copy_gmem_to_smem(q_seg_ref.at[batch, pl.ds(q_base, ROWS)],
                                    q_seg_smem2.at[wg], own_ready.at[8 + wg])
        for i in range(4):
            plgpu.barrier_wait(own_ready.at[4 * wg + i])
        lse = _compat.mgpu_load(lse_smem2.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
        delta = _compat.mgpu_load(delta_smem2.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
        steps = pl.cdiv(q_base + ROWS, jnp.array(bkv, jnp.int32)) if causal else block_steps
        if segments:
            plgpu.barrier_wait(own_ready.at[8 + wg])
            q_seg = _compat.mgpu_load(q_seg_smem2.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
            own_lo, full_lo, full_hi, steps = (spans_ref[batch, tile, wg, i] for i in range(1, 5))

        def step(j, dq, masked: bool):
            slot = lax.rem(j, jnp.array(stages, j.dtype))
            plgpu.barrier_wait(k_ready.at[slot])
            plgpu.barrier_wait(v_ready.at[slot])

            def s_and_dp(refs):  # both matmuls in flight together, one wait
                s_ref, dp_ref = refs
                plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                plgpu.wgmma(dp_ref, do_smem, plgpu.transpose_ref(v_smem.at[slot], (1, 0)))

            s, dp = pl.run_state(s_and_dp)(
                (plgpu.ACC.init(_zeros((ROWS, bkv))), plgpu.ACC.init(_zeros((ROWS, bkv)))))
            plgpu.barrier_arrive(v_free.at[slot])
            s = s * scale2
            if masked and segments:  # the key tile's ids ride with K (k_free comes later)
                kv_seg = _compat.mgpu_load(kv_seg_smem.at[slot],
                                           layout=plgpu.Layout.WGMMA.reduce(0))
                keep = gpu_hopper.same_segment(q_seg, kv_seg, s.shape)
                if causal:
                    r = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
                    c = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
                    keep &= r + q_base >= c + j * bkv
                s = jnp.where(keep, s, -jnp.inf)
            elif masked:
                r = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
                c = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
                s = jnp.where(r + q_base >= c + j * bkv, s, -jnp.inf)
            p = jnp.exp2(s - lax.broadcast_in_dim(lse, s.shape, [0]))
            ds = p * (dp - lax.broadcast_in_dim(delta, s.shape, [0]))

            def ds_k(acc_ref):
                plgpu.wgmma(acc_ref, ds.astype(k_ref.dtype), k_smem.at[slot])

            dq = pl.run_state(ds_k)(plgpu.ACC.init(dq))
            plgpu.barrier_arrive(k_free.at[slot])
            return dq

        def skip(j, _):
            # A tile only the other warpgroup needs: wait for it all the same, then release
            # it. The waits keep this warpgroup's barrier phases in step (Mosaic GPU tracks
            # them per thread) and keep it from running ahead: releasing tiles j and
            # j + stages before the other warpgroup released j would complete that slot's
            # "free" phase twice over and let the memory warpgroup overwrite tile j in use.
            slot = lax.rem(j, jnp.array(stages, j.dtype))
            plgpu.barrier_wait(k_ready.at[slot])
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_arrive(k_free.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])

        dq = _zeros((ROWS, q_ref.shape[-1]))
        if segments:  # skipped, masked, unmasked, masked, skipped
            lax.fori_loop(lo, own_lo, skip, None)
            dq = lax.fori_loop(own_lo, full_lo, functools.partial(step, masked=True), dq)
            dq = lax.fori_loop(full_lo, full_hi, functools.partial(step, masked=False), dq)
            dq = lax.fori_loop(full_hi, steps, functools.partial(step, masked=True), dq)
            lax.fori_loop(steps, block_steps, skip, None)
        elif not causal:
            dq = lax.fori_loop(0, steps, functools.partial(step, masked=False), dq)
        else:
            unmasked = lax.div(q_base, jnp.array(bkv, jnp.int32))
            dq = lax.fori_loop(0, unmasked, functools.partial(step, masked=False), dq)
            dq = lax.fori_loop(unmasked, steps, functools.partial(step, masked=True), dq)

            @pl.loop(steps, block_steps)
            def _(j):  # release the slots only the other (later) warpgroup needed
                slot = lax.rem(j, jnp.array(stages, j.dtype))
                plgpu.barrier_arrive(k_free.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])

        q_smem[...] = (dq * sm_scale).astype(q_ref.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(head, jnp.array(group, head.dtype))

        def load(j, slot):
            rows = (batch, pl.ds(j * bkv, bkv), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_ready.at[slot])
            if segments:  # on K's barrier (2 arrivals)
                plgpu.copy_gmem_to_smem(kv_seg_ref.at[batch, pl.ds(j * bkv, bkv)],
                                        kv_seg_smem.at[slot], k_ready.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_ready.at[slot])

        def wait_free(slot):
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])

        _stream(load, wait_free, block_steps, stages, lo=lo if segments else None)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_refs, dk_ref, dv_ref,
                smem, bars, *, causal: bool, scale2: float, sm_scale: float, bq: int,
                stages: int, group: int, q_len: int):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    k_smem2, v_smem2, q_smem, do_smem, lse_smem, delta_smem, *seg_smem = smem
    own_ready, q_ready, do_ready, lse_ready, delta_ready, free = bars
    batch, kv_head = lax.axis_index("batch"), lax.axis_index("heads")
    wg = lax.axis_index("wg")
    block_base = lax.axis_index("kv_seq") * (2 * ROWS)  # first key row of the block
    # Query tiles per head: causal blocks start at the tile holding their first key's
    # row (earlier queries see none of these keys); the first `diagonal` tiles cross it.
    first = lax.div(block_base, jnp.array(bq, jnp.int32)) if causal else jnp.int32(0)
    per_head = jnp.int32(q_len // bq) - first
    diagonal = -(-2 * ROWS // bq) if causal else 0
    segments = bool(seg_refs)
    if segments:  # query tiles [first, first + per_head) of every head (segment_spans)
        q_seg_ref, kv_seg_ref, spans_ref = seg_refs
        kv_seg_smem2, q_seg_smem = seg_smem
        kv_block = lax.axis_index("kv_seq")
        first = spans_ref[batch, kv_block, 0, 0]
        per_head = spans_ref[batch, kv_block, 0, 5] - first

    @pl.when(wg < 2)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
        kv_base = block_base + wg * ROWS
        rows = (batch, pl.ds(kv_base, ROWS), kv_head)
        plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem, own_ready.at[2 * wg])
        plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem, own_ready.at[2 * wg + 1])
        if segments:
            plgpu.copy_gmem_to_smem(kv_seg_ref.at[batch, pl.ds(kv_base, ROWS)],
                                    kv_seg_smem2.at[wg], own_ready.at[4 + wg])
        plgpu.barrier_wait(own_ready.at[2 * wg])
        plgpu.barrier_wait(own_ready.at[2 * wg + 1])
        if segments:
            plgpu.barrier_wait(own_ready.at[4 + wg])
            kv_seg = _compat.mgpu_load(kv_seg_smem2.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
            # This warpgroup's query tiles, counted from the block's first one.
            own_lo, full_lo, full_hi, own_hi = (spans_ref[batch, kv_block, wg, i] - first
                                                for i in range(1, 5))

        def step(i, carry, g, masked: bool):
            dk, dv = carry
            j = g * per_head + i  # position in the stream
            slot = lax.rem(j, jnp.array(stages, j.dtype))
            plgpu.barrier_wait(q_ready.at[slot])

            def k_qt(acc_ref):
                plgpu.wgmma(acc_ref, k_smem, plgpu.transpose_ref(q_smem.at[slot], (1, 0)))
                return acc_ref[...]

            def k_qt_and_ids(acc_ref):  # the query tile's ids (landed with it), read while
                plgpu.wgmma(acc_ref, k_smem, plgpu.transpose_ref(q_smem.at[slot], (1, 0)))
                ids = _compat.mgpu_load(q_seg_smem.at[slot],  # the MMA runs
                                        layout=plgpu.Layout.WGMMA.reduce(0))
                return acc_ref[...], ids

            if masked and segments:
                s_t, q_seg = pl.run_scoped(k_qt_and_ids, plgpu.ACC((ROWS, bq), jnp.float32))
                s_t = s_t * scale2
                keep = gpu_hopper.same_segment(kv_seg, q_seg, s_t.shape)
                if causal:
                    r = plgpu.broadcasted_iota(jnp.int32, s_t.shape, 0, layout=plgpu.Layout.WGMMA)
                    c = plgpu.broadcasted_iota(jnp.int32, s_t.shape, 1, layout=plgpu.Layout.WGMMA)
                    keep &= c + (first + i) * bq >= r + kv_base
                s_t = jnp.where(keep, s_t, -jnp.inf)
            else:
                s_t = pl.run_scoped(k_qt, plgpu.ACC((ROWS, bq), jnp.float32)) * scale2
            if masked and not segments:  # key row r sees query column c when c's position >= r's
                r = plgpu.broadcasted_iota(jnp.int32, s_t.shape, 0, layout=plgpu.Layout.WGMMA)
                c = plgpu.broadcasted_iota(jnp.int32, s_t.shape, 1, layout=plgpu.Layout.WGMMA)
                s_t = jnp.where(c + (first + i) * bq >= r + kv_base, s_t, -jnp.inf)
            plgpu.barrier_wait(lse_ready.at[slot])
            lse = _compat.mgpu_load(lse_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
            p_t = jnp.exp2(s_t - lax.broadcast_in_dim(lse, s_t.shape, [1]))
            plgpu.barrier_wait(do_ready.at[slot])

            def dv_and_dpt(refs):  # both matmuls in flight together, one wait
                dv_ref, dpt_ref = refs
                plgpu.wgmma(dv_ref, p_t.astype(q_ref.dtype), do_smem.at[slot])
                plgpu.wgmma(dpt_ref, v_smem, plgpu.transpose_ref(do_smem.at[slot], (1, 0)))

            dv, dp_t = pl.run_state(dv_and_dpt)(
                (plgpu.ACC.init(dv), plgpu.ACC.init(_zeros((ROWS, bq)))))
            plgpu.barrier_wait(delta_ready.at[slot])
            delta = _compat.mgpu_load(delta_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
            ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, s_t.shape, [1]))

            def ds_q(acc_ref):
                plgpu.wgmma(acc_ref, ds_t.astype(q_ref.dtype), q_smem.at[slot])

            dk = pl.run_state(ds_q)(plgpu.ACC.init(dk))
            plgpu.barrier_arrive(free.at[slot])
            return dk, dv

        def skip(i, carry, g):  # a query tile only the other warpgroup needs: wait on
            j = g * per_head + i  # its barriers all the same (per-thread phases), release it
            slot = lax.rem(j, jnp.array(stages, j.dtype))
            for ready in (q_ready, lse_ready, do_ready, delta_ready):
                plgpu.barrier_wait(ready.at[slot])
            plgpu.barrier_arrive(free.at[slot])
            return carry

        def head_loop(g, carry):
            if segments:  # skipped, masked, unmasked, masked, skipped
                for start, stop, body in (
                        (0, own_lo, skip), (own_lo, full_lo, functools.partial(step, masked=True)),
                        (full_lo, full_hi, functools.partial(step, masked=False)),
                        (full_hi, own_hi, functools.partial(step, masked=True)),
                        (own_hi, per_head, skip)):
                    carry = lax.fori_loop(start, stop, functools.partial(body, g=g), carry)
                return carry
            masked_steps = jnp.minimum(diagonal, per_head)
            carry = lax.fori_loop(0, masked_steps,
                                  functools.partial(step, g=g, masked=True), carry)
            return lax.fori_loop(masked_steps, per_head,
                                 functools.partial(step, g=g, masked=False), carry)

        d, dv_dim = q_ref.shape[-1], v_ref.shape[-1]
        dk, dv = lax.fori_loop(0, group, head_loop, (_zeros((ROWS, d)), _zeros((ROWS, dv_dim))))
        k_smem[...] = (dk * sm_scale).astype(k_ref.dtype)
        v_smem[...] = dv.astype(v_ref.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[rows])
        plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[rows])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")

        def load(j, slot):
            g, i = lax.div(j, per_head), lax.rem(j, per_head)
            head = kv_head * group + g
            rows = (batch, pl.ds((first + i) * bq, bq), head)
            stats = (batch, head, pl.ds((first + i) * bq, bq))
            plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[slot], q_ready.at[slot])
            if segments:  # on Q's barrier (2 arrivals)
                plgpu.copy_gmem_to_smem(q_seg_ref.at[batch, pl.ds((first + i) * bq, bq)],
                                        q_seg_smem.at[slot], q_ready.at[slot])
            plgpu.copy_gmem_to_smem(lse_ref.at[stats], lse_smem.at[slot], lse_ready.at[slot])
            plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[slot], do_ready.at[slot])
            plgpu.copy_gmem_to_smem(delta_ref.at[stats], delta_smem.at[slot],
                                    delta_ready.at[slot])

        _stream(load, lambda slot: plgpu.barrier_wait(free.at[slot]), group * per_head, stages)


def backward(q, k, v, do, lse, delta, *, causal: bool, sm_scale: float,
             blocks: HopperBackwardBlocks | None = None, segment_ids=None):
    """(dq, dk, dv) of softmax(sm_scale q kᵀ) v.

    lse: [B, H, T] f32 natural log-sum-exp saved by the forward; delta: [B, H, T] f32,
    rowsum(o * dO) less the log-sum-exp cotangent. Shapes and segment_ids as
    gpu_hopper.forward's.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    b, t, h, d = q.shape
    hkv, dv = k.shape[2], v.shape[3]
    group = h // hkv
    blocks = blocks or HopperBackwardBlocks()
    reason = unsupported_reason(q, k, v, blocks=blocks, segment_ids=segment_ids)
    if reason:
        raise ValueError(f"gpu_hopper_bwd.backward: {reason}")
    segments = segment_ids is not None
    lse2 = (lse * gpu_hopper.LOG2E).astype(jnp.float32)  # base 2, like the kernels' logits
    if segments:  # a row that saw no key (lse -inf): +inf makes its p = exp2(s - lse) 0
        lse2 = jnp.where(jnp.isfinite(lse), lse2, jnp.inf)
        q_seg, kv_seg = (x.astype(jnp.int32)
                         for x in reference.split_segment_ids(segment_ids, t, t))
    delta = delta.astype(jnp.float32)
    do = do.astype(q.dtype)
    scale2 = float(sm_scale) * gpu_hopper.LOG2E
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    params = plgpu.CompilerParams(approx_math=True)

    def tiles(n, rows, dim):
        return plgpu.SMEM((n, rows, dim), q.dtype, transforms=transforms)

    # dq: a thread block per 2 x 64 query rows of one head.
    bkv = blocks.block_kv_dq
    stages = min(blocks.stages, t // bkv)
    num_q_tiles = t // (2 * ROWS)
    dq_kernel = functools.partial(
        _dq_kernel, causal=causal, scale2=scale2, sm_scale=float(sm_scale), bkv=bkv,
        stages=stages, group=group, num_q_tiles=num_q_tiles, kv_len=t)
    seg_args = ()
    if segments:
        seg_args = (q_seg, kv_seg, gpu_hopper.segment_spans(
            q_seg, kv_seg, causal=causal, rows=ROWS, block=bkv, over="kv"))
    suffix = f"{'_causal' if causal else ''}{'_segments' if segments else ''}"

    def dq_entry(*refs):
        *inputs, dq_ref = refs
        smem = (tiles(2, ROWS, d), tiles(2, ROWS, dv), plgpu.SMEM((2, ROWS), jnp.float32),
                plgpu.SMEM((2, ROWS), jnp.float32), tiles(stages, bkv, d),
                tiles(stages, bkv, dv))
        own, arrivals = 8, 1  # own_ready: q, dO, lse, delta per warpgroup (+ ids)
        if segments:  # the rows' ids per warpgroup; a key tile's ids per slot, on K's barrier
            smem += (plgpu.SMEM((2, ROWS), jnp.int32), plgpu.SMEM((stages, bkv), jnp.int32))
            own, arrivals = 10, 2
        bars = (plgpu.Barrier(num_barriers=own),
                plgpu.Barrier(num_arrivals=arrivals, num_barriers=stages),
                plgpu.Barrier(num_barriers=stages),
                plgpu.Barrier(num_arrivals=2, num_barriers=stages),
                plgpu.Barrier(num_arrivals=2, num_barriers=stages))
        pl.run_scoped(
            lambda *scoped: dq_kernel(*inputs[:6], tuple(inputs[6:]), dq_ref, *scoped),
            smem, bars, collective_axes="wg")

    name = f"flash_bwd_dq_hopper_bkv{bkv}{suffix}"
    with jax.named_scope(name):
        dq = plgpu.kernel(
            dq_entry, out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
            grid=(h, num_q_tiles, b), grid_names=("heads", "q_seq", "batch"),
            num_threads=3, thread_name="wg", kernel_name=name, compiler_params=params,
        )(q, k, v, do, lse2, delta, *seg_args)

    # dk, dv: a thread block per 2 x 64 key rows of one kv head, looping over its group.
    bq = blocks.block_q_dkv
    stages = min(blocks.stages, t // bq)
    dkv_kernel = functools.partial(
        _dkv_kernel, causal=causal, scale2=scale2, sm_scale=float(sm_scale), bq=bq,
        stages=stages, group=group, q_len=t)
    if segments:
        seg_args = (q_seg, kv_seg, gpu_hopper.segment_spans(
            q_seg, kv_seg, causal=causal, rows=ROWS, block=bq, over="q"))

    def dkv_entry(*refs):
        *inputs, dk_ref, dv_ref = refs
        smem = (tiles(2, ROWS, d), tiles(2, ROWS, dv), tiles(stages, bq, d),
                tiles(stages, bq, dv), plgpu.SMEM((stages, bq), jnp.float32),
                plgpu.SMEM((stages, bq), jnp.float32))
        own, arrivals = 4, 1  # own_ready: k, v per warpgroup (+ ids)
        if segments:  # the key rows' ids per warpgroup; a query tile's ids per slot, on Q's
            smem += (plgpu.SMEM((2, ROWS), jnp.int32), plgpu.SMEM((stages, bq), jnp.int32))
            own, arrivals = 6, 2
        bars = (plgpu.Barrier(num_barriers=own),
                plgpu.Barrier(num_arrivals=arrivals, num_barriers=stages)) + (
            plgpu.Barrier(num_barriers=stages),) * 3 + (
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),)
        pl.run_scoped(
            lambda *scoped: dkv_kernel(*inputs[:6], tuple(inputs[6:]), dk_ref, dv_ref, *scoped),
            smem, bars, collective_axes="wg")

    name = f"flash_bwd_dkv_hopper_bq{bq}{suffix}"
    with jax.named_scope(name):
        dk, dv_ = plgpu.kernel(
            dkv_entry,
            out_type=(jax.ShapeDtypeStruct(k.shape, k.dtype),
                      jax.ShapeDtypeStruct(v.shape, v.dtype)),
            grid=(hkv, t // (2 * ROWS), b), grid_names=("heads", "kv_seq", "batch"),
            num_threads=3, thread_name="wg", kernel_name=name, compiler_params=params,
        )(q, k, v, do, lse2, delta, *seg_args)
    return dq, dk, dv_
