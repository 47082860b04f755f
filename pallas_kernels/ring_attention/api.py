"""Ring attention: exact attention over a sequence split across the devices of a mesh axis.

Ring Attention (Liu, Zaharia, Abbeel 2023, https://arxiv.org/abs/2310.01889): each of
the N devices of the ring axis holds T/N queries and T/N keys/values. In N steps the K/V
blocks travel once around the ring (`lax.ppermute`, issued before the step's compute so
the transfer overlaps it); at each step a device attends its queries to the visiting
block and folds the partial result into its running output by log-sum-exp:

    lse = logaddexp(lse, lse_j)      o = exp(lse_old - lse) o + exp(lse_j - lse) o_j

Striped Attention (Brandon et al. 2023, https://arxiv.org/abs/2311.09431) stripes the
tokens over the devices (layout.py) so a causal mask gives each device the same work.
The block worker masks from GLOBAL positions (block.py), so both layouts are exact.
Blocks that no unmasked pair reaches (contiguous + causal: the future) are skipped.

The backward is a custom VJP that rotates K/V a second time, together with their dk/dv
accumulators, which arrive home after the last step; dq stays local. Each step
recomputes its block (FlashAttention's trade) from the saved global (o, lse):

    dS_j = P_j * (dO V_j^T - rowsum(dO * O) + dlse),   P_j = exp(S_j - lse)

obtained as the pullback of the block worker with do_j = w_j dO and
dlse_j = w_j (<dO, o_j> - <dO, O> + dlse), w_j = exp(lse_j - lse). No device ever holds
more than two K/V blocks: memory per device falls as 1/N, and there is no all-gather.

Two levels (DESIGN.md):
  ring_attention(q, k, v, *, mesh, ...)      global [B, T, H, D] arrays in natural order;
                                             applies the layout and shard_map itself.
  ring_attention_in_layout(q, k, v, *, mesh, positions, ...)
                                             global arrays already in the layout (models
                                             permute once at the input).
  ring_attention_shard(q, k, v, q_positions, kv_positions, ...)
                                             the per-shard body, inside shard_map.

    import jax, jax.numpy as jnp
    from pallas_kernels.ring_attention import ring_attention
    mesh = jax.make_mesh((jax.device_count(),), ("sequence",))
    q = k = v = jax.random.normal(jax.random.key(0), (1, 64 * jax.device_count(), 4, 16))
    o = ring_attention(q, k, v, mesh=mesh, layout="striped", causal=True)
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels._compat import shard_map
from pallas_kernels.flash_attention.api import validate_inputs as validate_attention_inputs
from pallas_kernels.ring_attention.block import (
    RING_IMPLS,
    BlockConfig,
    block_attention,
    block_attention_vjp,
    block_is_live,
    empty_block,
    maybe_skip,
)
from pallas_kernels.ring_attention.layout import (
    check_layout,
    from_layout,
    layout_positions,
    to_layout,
)

F32 = jnp.float32


# ----------------------------------------------------------------------------- helpers
def _bthd(w):  # [B, H, Tq] -> [B, Tq, H, 1], to scale outputs row by row
    return jnp.swapaxes(w, 1, 2)[..., None]


def _row_dot(a, b):  # <a, b> over head_dim: [B, Tq, H, D] x2 -> [B, H, Tq]
    return jnp.swapaxes(jnp.sum(a.astype(F32) * b.astype(F32), axis=-1), 1, 2)


def _rotate(x, axis_name: str, n: int):
    """Send `x` (a pytree) to the next device of the ring: device i -> i + 1 (mod n)."""
    if n == 1:
        return x
    return lax.ppermute(x, axis_name, perm=[(i, (i + 1) % n) for i in range(n)])


def merge_partials(o, lse, o_j, lse_j):
    """Fold a partial result (o_j, lse_j) into (o, lse); o in f32, lse [B, H, Tq] f32."""
    new = jnp.logaddexp(lse, lse_j)                 # -inf only if both are -inf
    safe = jnp.where(jnp.isneginf(new), 0.0, new)  # then both weights below are 0
    o = o * _bthd(jnp.exp(lse - safe)) + o_j.astype(F32) * _bthd(jnp.exp(lse_j - safe))
    return o, new


def merge_sinks(o, lse, sinks):
    """Attention sinks: one more softmax term per head with no value (gpt-oss)."""
    sink = sinks.astype(F32)[None, :, None]      # [1, H, 1]
    lse_all = jnp.logaddexp(lse, sink)
    o = (o.astype(F32) * _bthd(jnp.exp(lse - lse_all))).astype(o.dtype)
    return o, lse_all


def _axis_size(axis_name: str) -> int:
    try:
        return lax.axis_size(axis_name)
    except NameError:
        raise ValueError(f"{axis_name=} is not a bound mesh axis: call ring_attention_shard "
                         "inside shard_map over a mesh with that axis") from None


# ----------------------------------------------------------------------------- the ring
def _ring_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, axis_name, cfg: BlockConfig):
    n = _axis_size(axis_name)
    b, tq, h, _ = q.shape
    o = jnp.zeros((b, tq, h, v.shape[3]), F32)
    lse = jnp.full((b, h, tq), -jnp.inf, F32)

    def step(carry, rotate: bool):
        kv, o, lse = carry  # kv: the visiting (k, v, kv_pos, kv_seg)
        nxt = _rotate(kv, axis_name, n) if rotate else kv  # issued first: overlaps compute
        k_j, v_j, kvp_j, kvs_j = kv
        o_j, lse_j = maybe_skip(
            block_is_live(q_pos, kvp_j, q_seg, kvs_j, cfg),
            lambda: block_attention(q, k_j, v_j, q_pos, kvp_j, q_seg, kvs_j, cfg),
            lambda: empty_block(q, v_j), cfg)
        o, lse = merge_partials(o, lse, o_j, lse_j)
        return nxt, o, lse

    carry = ((k, v, kv_pos, kv_seg), o, lse)
    carry = lax.fori_loop(0, n - 1, lambda _, c: step(c, True), carry)  # steps 0..n-2
    _, o, lse = step(carry, rotate=False)                               # step n-1: no send
    return o.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _ring(q, k, v, q_pos, kv_pos, q_seg, kv_seg, axis_name, cfg):
    return _ring_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, axis_name, cfg)


def _ring_fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, axis_name, cfg):
    o, lse = _ring_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, axis_name, cfg)
    return (o, lse), (q, k, v, q_pos, kv_pos, q_seg, kv_seg, o, lse)


def _ring_bwd(axis_name, cfg, res, cotangents):
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, o, lse = res
    do, dlse = cotangents
    n = _axis_size(axis_name)
    do32, dlse = do.astype(F32), dlse.astype(F32)
    lse_safe = jnp.where(jnp.isneginf(lse), 0.0, lse)  # empty rows: every w_j below is 0
    delta = _row_dot(do32, o)                           # <dO, O> per row, [B, H, Tq]

    def block_grads(kv):
        k_j, v_j, kvp_j, kvs_j = kv

        def compute():
            (o_j, lse_j), pullback = block_attention_vjp(q, k_j, v_j, q_pos, kvp_j, q_seg, kvs_j, cfg)
            w = jnp.exp(lse_j - lse_safe)               # block j's share of each row, [B, H, Tq]
            do_j = (do32 * _bthd(w)).astype(o_j.dtype)
            dlse_j = w * (_row_dot(do32, o_j) - delta + dlse)
            dq, dk, dv = pullback((do_j, dlse_j))
            return dq.astype(F32), dk.astype(F32), dv.astype(F32)

        def skipped():
            return (jnp.zeros(q.shape, F32), jnp.zeros(k_j.shape, F32), jnp.zeros(v_j.shape, F32))

        return maybe_skip(block_is_live(q_pos, kvp_j, q_seg, kvs_j, cfg), compute, skipped, cfg)

    def step(carry, rotate: bool):
        kv, dk, dv, dq = carry  # dk, dv: the accumulators of the visiting block, travelling with it
        nxt = _rotate(kv, axis_name, n) if rotate else kv  # issued first: overlaps compute
        dq_j, dk_j, dv_j = block_grads(kv)
        dk, dv = _rotate((dk + dk_j, dv + dv_j), axis_name, n)  # follow the block to the next device
        return nxt, dk, dv, dq + dq_j

    carry = ((k, v, kv_pos, kv_seg), jnp.zeros(k.shape, F32), jnp.zeros(v.shape, F32),
             jnp.zeros(q.shape, F32))
    carry = lax.fori_loop(0, n - 1, lambda _, c: step(c, True), carry)
    # After the last step each accumulator has made n hops: it is back on its block's device.
    _, dk, dv, dq = step(carry, rotate=False)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


# ----------------------------------------------------------------------------- per shard
def ring_attention_shard(
    q,
    k,
    v,
    q_positions,
    kv_positions,
    q_segment_ids=None,
    kv_segment_ids=None,
    *,
    axis_name: str = "sequence",
    causal: bool = False,
    sliding_window: int | None = None,
    logit_soft_cap: float | None = None,
    sm_scale: float | None = None,
    sinks=None,
    impl: str = "auto",
    block_sizes=None,
    skip_masked_blocks: bool = True,
    return_lse: bool = False,
):
    """Ring attention on this device's shard; call inside `shard_map` over `axis_name`.

    Args:
      q: [B, Tq, H, D] local queries (any layout: the positions say where they are).
      k, v: [B, Tk, Hkv, D] local keys/values; Hkv divides H (GQA, no repeat).
      q_positions, kv_positions: int [B, Tq], [B, Tk] GLOBAL positions of the local tokens.
      q_segment_ids, kv_segment_ids: int [B, Tq], [B, Tk] or None (packed documents).
      axis_name: the mesh axis of the ring.
      causal, sliding_window, logit_soft_cap, sm_scale, sinks: as in
        `flash_attention.reference.mha_reference`, over the global sequence.
      impl: block worker, one of RING_IMPLS.
      block_sizes: the kernel's BlockSizes (pallas impls).
      skip_masked_blocks: skip blocks with no unmasked pair (`lax.cond`).
      return_lse: also return the log-sum-exp [B, H, Tq] (f32, -inf on empty rows).

    Returns:
      o [B, Tq, H, Dv] in q.dtype (and lse if asked).
    """
    if impl not in RING_IMPLS:
        raise ValueError(f"{impl=} must be one of {RING_IMPLS}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    segment_ids = None if q_segment_ids is None else (q_segment_ids, kv_segment_ids)
    validate_attention_inputs(q, k, v, segment_ids, q_positions, kv_positions, sliding_window,
                              sinks, "reference")
    if q_positions is None:
        raise ValueError("q_positions and kv_positions are required: the ring masks by global position")
    cfg = BlockConfig(impl=impl, causal=bool(causal), sliding_window=sliding_window,
                      logit_soft_cap=None if logit_soft_cap is None else float(logit_soft_cap),
                      sm_scale=None if sm_scale is None else float(sm_scale),
                      block_sizes=block_sizes, skip_masked_blocks=bool(skip_masked_blocks))
    as_int = lambda x: None if x is None else x.astype(jnp.int32)
    o, lse = _ring(q, k, v, as_int(q_positions), as_int(kv_positions), as_int(q_segment_ids),
                   as_int(kv_segment_ids), axis_name, cfg)
    if sinks is not None:
        o, lse = merge_sinks(o, lse, sinks)
    return (o, lse) if return_lse else o


# ----------------------------------------------------------------------------- global arrays
def _mesh_sizes(mesh) -> dict[str, int]:
    return {name: int(size) for name, size in dict(mesh.shape).items()}


def _default_batch_axes(mesh, axis_name: str) -> tuple[str, ...]:
    return tuple(a for a in ("data", "fsdp") if a in _mesh_sizes(mesh) and a != axis_name)


def _default_head_axis(mesh, axis_name: str, heads: int, kv_heads: int) -> str | None:
    size = _mesh_sizes(mesh).get("tensor", 1)
    if axis_name != "tensor" and size > 1 and heads % size == 0 and kv_heads % size == 0:
        return "tensor"
    return None


def _check_mesh(mesh, axis_name, batch_axes, head_axis, q, k):
    sizes = _mesh_sizes(mesh)
    if axis_name not in sizes:
        raise ValueError(f"{axis_name=} is not an axis of the mesh; its axes are {tuple(sizes)}")
    for a in tuple(batch_axes) + ((head_axis,) if head_axis else ()):
        if a not in sizes or a == axis_name:
            raise ValueError(f"batch/head axis {a!r} must be a mesh axis other than {axis_name=}; "
                             f"the mesh axes are {tuple(sizes)}")
    b, t, h = q.shape[:3]
    if k.shape[1] != t:
        raise ValueError(f"ring attention is self-attention: q length {t} != kv length {k.shape[1]}")
    n = sizes[axis_name]
    if t % n:
        raise ValueError(f"sequence length {t} must be divisible by mesh.{axis_name}={n}")
    nb = int(np.prod([sizes[a] for a in batch_axes]))
    if b % nb:
        raise ValueError(f"batch {b} must be divisible by {batch_axes=} of total size {nb}")
    if head_axis and (h % sizes[head_axis] or k.shape[2] % sizes[head_axis]):
        raise ValueError(f"heads {h} and kv heads {k.shape[2]} must be divisible by "
                         f"mesh.{head_axis}={sizes[head_axis]}")


def _place(x, mesh, spec):
    """shard_map (jax >= 0.10) wants arguments that already carry its in_specs sharding."""
    if x is None:
        return x
    explicit = any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ()))
    sharding = NamedSharding(mesh, spec) if isinstance(mesh, jax.sharding.Mesh) else spec
    if explicit:  # typed shardings: reshard, traced or not
        return jax.sharding.reshard(x, sharding)
    if isinstance(x, jax.core.Tracer) or not isinstance(mesh, jax.sharding.Mesh):
        return x  # Auto axes inside jit: the compiler reshards as needed
    return jax.device_put(x, sharding)


def _in_auto_mode(fn, mesh, spec):
    """Run the layout permutation `fn` on meshes with Explicit axes too.

    Explicit sharding types every reshape of a sharded dim; the permutation is a plain
    reshuffle, so let the compiler choose how (Auto axes) and name only the result.
    """
    if all(t != AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
        return fn
    out = NamedSharding(mesh, spec) if isinstance(mesh, jax.sharding.Mesh) else spec
    return jax.sharding.auto_axes(fn, out_sharding=out)


def ring_attention_in_layout(
    q,
    k,
    v,
    *,
    mesh,
    positions=None,
    segment_ids=None,
    axis_name: str = "sequence",
    causal: bool = False,
    sliding_window: int | None = None,
    logit_soft_cap: float | None = None,
    sm_scale: float | None = None,
    sinks=None,
    impl: str = "auto",
    block_sizes=None,
    batch_axes: tuple[str, ...] | None = None,
    head_axis: str | None = "auto",
    skip_masked_blocks: bool = True,
):
    """Ring attention on global arrays whose sequence axis is already in a layout.

    The sequence axis is split in N equal contiguous slices over `axis_name`, so slice
    d is device d's share; `positions` ([B, T] int, the true position of every slot;
    default 0..T-1 in array order) make the masks exact for any layout.

    Args:
      q, k, v: [B, T, H, D], [B, T, Hkv, D] global arrays (or tracers inside jit).
      mesh: a Mesh (or the AbstractMesh inside `jax.set_mesh`) with `axis_name`.
      batch_axes: mesh axes the batch is split over (default: "data", "fsdp" if present).
      head_axis: mesh axis the heads are split over; "auto" picks "tensor" if it divides
        both head counts, None keeps heads whole.
      Other arguments: as in `ring_attention_shard`.

    Returns:
      o [B, T, H, Dv], in the same layout as q.
    """
    if impl not in RING_IMPLS:
        raise ValueError(f"{impl=} must be one of {RING_IMPLS}")
    validate_attention_inputs(q, k, v, segment_ids, positions, positions, sliding_window, sinks,
                              "reference")
    if isinstance(segment_ids, (tuple, list)):
        raise ValueError("segment_ids must be one [batch, seq] array (ring attention is self-attention)")
    batch_axes = _default_batch_axes(mesh, axis_name) if batch_axes is None else tuple(batch_axes)
    if head_axis == "auto":
        head_axis = _default_head_axis(mesh, axis_name, q.shape[2], k.shape[2])
    _check_mesh(mesh, axis_name, batch_axes, head_axis, q, k)
    b, t = q.shape[:2]
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    bt = P(batch_axes or None, axis_name)                    # [B, T] arrays
    bthd = P(batch_axes or None, axis_name, head_axis, None)  # [B, T, H, D] arrays
    bht = P(batch_axes or None, head_axis, axis_name)         # lse [B, H, T]

    def body(q, k, v, pos, seg):
        return ring_attention_shard(
            q, k, v, pos, pos, seg, seg, axis_name=axis_name, causal=causal,
            sliding_window=sliding_window, logit_soft_cap=logit_soft_cap, sm_scale=sm_scale,
            impl=impl, block_sizes=block_sizes, skip_masked_blocks=skip_masked_blocks,
            return_lse=True)

    args = [(q, bthd), (k, bthd), (v, bthd), (positions, bt), (segment_ids, bt)]
    ring = shard_map(body, mesh=mesh, in_specs=tuple(s for _, s in args), out_specs=(bthd, bht),
                     check_vma=False)
    o, lse = ring(*(_place(x, mesh, s) for x, s in args))
    if sinks is not None:  # outside shard_map: sinks are replicated over the ring
        o, lse = merge_sinks(o, lse, sinks)
    return o


def ring_attention(
    q,
    k,
    v,
    *,
    mesh,
    axis_name: str = "sequence",
    layout: str = "striped",
    stripe: int = 1,
    causal: bool = False,
    segment_ids=None,
    sliding_window: int | None = None,
    logit_soft_cap: float | None = None,
    sm_scale: float | None = None,
    sinks=None,
    impl: str = "auto",
    block_sizes=None,
    batch_axes: tuple[str, ...] | None = None,
    head_axis: str | None = "auto",
    skip_masked_blocks: bool = True,
):
    """Exact self-attention over global [B, T, H, D] arrays in natural token order.

    Permutes the sequence into `layout` ("striped" or "contiguous", layout.py), runs the
    ring over `axis_name` of `mesh` and permutes the output back. Masks are those of
    `flash_attention` with tokens at positions 0..T-1. Arguments as in
    `ring_attention_in_layout`; `stripe` is the striped layout's granularity in tokens.

    Raises:
      ValueError: naming the argument, for an unknown layout or impl, an axis not in the
        mesh, or a sequence length not divisible by the ring size (x stripe).
    """
    check_layout(layout, stripe=stripe)
    if impl not in RING_IMPLS:
        raise ValueError(f"{impl=} must be one of {RING_IMPLS}")
    validate_attention_inputs(q, k, v, segment_ids, None, None, sliding_window, sinks, "reference")
    sizes = _mesh_sizes(mesh)
    if axis_name not in sizes:
        raise ValueError(f"{axis_name=} is not an axis of the mesh; its axes are {tuple(sizes)}")
    n = sizes[axis_name]
    b, t = q.shape[:2]
    check_layout(layout, t, n, stripe)
    batch_axes = _default_batch_axes(mesh, axis_name) if batch_axes is None else tuple(batch_axes)
    if head_axis == "auto":
        head_axis = _default_head_axis(mesh, axis_name, q.shape[2], k.shape[2])
    _check_mesh(mesh, axis_name, batch_axes, head_axis, q, k)
    seq_spec = P(batch_axes or None, axis_name)
    perm = _in_auto_mode(functools.partial(to_layout, n=n, layout=layout, axis=1, stripe=stripe),
                         mesh, seq_spec)
    unperm = _in_auto_mode(functools.partial(from_layout, n=n, layout=layout, axis=1, stripe=stripe),
                           mesh, seq_spec)
    positions = jnp.asarray(layout_positions(t, n, layout, stripe, batch=b))
    o = ring_attention_in_layout(
        perm(q), perm(k), perm(v), mesh=mesh, positions=positions,
        segment_ids=None if segment_ids is None else perm(segment_ids), axis_name=axis_name,
        causal=causal, sliding_window=sliding_window, logit_soft_cap=logit_soft_cap,
        sm_scale=sm_scale, sinks=sinks, impl=impl, block_sizes=block_sizes,
        batch_axes=batch_axes, head_axis=head_axis, skip_masked_blocks=skip_masked_blocks)
    return unperm(o)
