"""The Pallas TPU flash-attention kernel (interpret mode on CPU) against reference.py.

Each case runs forward (o and log-sum-exp) and backward (dq, dk, dv through `jax.vjp`)
in one jitted call and compares with `reference.mha_reference` and its autodiff
gradients. Interpret mode compiles slowly, so the unmarked cases are few and combine
features; `@pytest.mark.slow` runs a wider grid.
"""
import dataclasses
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from pallas_kernels.flash_attention import api, reference, tpu, tpu_mask


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int = 1
    q_len: int = 40
    kv_len: int = 40
    heads: int = 2
    kv_heads: int = 1
    d_qk: int = 16
    d_v: int = 16
    causal: bool = False
    window: int | None = None
    soft_cap: float | None = None
    segments: str | None = None  # None | "shared" (one [B,T] array) | "pair" (q, kv arrays)
    positions: str | None = None  # None | "striped" (ring-attention shard positions)
    sinks: bool = False
    block_q: int = 16
    block_kv: int = 16
    dtype: str = "float32"

    def __str__(self):
        return "-".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                        if getattr(self, f.name) != f.default) or "default"


def _segments(key, batch, length, num_docs=3):
    """Packed documents: sorted ids 1..num_docs, trailing padding (id 0) in the last row."""
    ids = jnp.sort(jax.random.randint(key, (batch, length), 1, num_docs + 1), axis=1)
    return ids.at[-1, length - 5:].set(0)


def _inputs(case: Case, seed=0):
    keys = jax.random.split(jax.random.key(seed), 8)
    dtype = jnp.dtype(case.dtype)
    b, tq, tk = case.batch, case.q_len, case.kv_len
    q = jax.random.normal(keys[0], (b, tq, case.heads, case.d_qk), dtype)
    k = jax.random.normal(keys[1], (b, tk, case.kv_heads, case.d_qk), dtype)
    v = jax.random.normal(keys[2], (b, tk, case.kv_heads, case.d_v), dtype)
    do = jax.random.normal(keys[3], (b, tq, case.heads, case.d_v), dtype)
    dlse = jax.random.normal(keys[4], (b, case.heads, tq), jnp.float32)
    kw = dict(causal=case.causal, sliding_window=case.window, logit_soft_cap=case.soft_cap)
    if case.segments == "shared":
        kw["segment_ids"] = _segments(keys[5], b, tq)
    elif case.segments == "pair":
        q_seg, kv_seg = _segments(keys[5], b, tq), _segments(keys[6], b, tk)
        # Query 0 gets an id no key has: its row is fully masked (output 0, no NaN).
        kw["segment_ids"] = (q_seg.at[:, 0].set(9), kv_seg)
    if case.positions == "striped":
        # Shard 1 of 3 in ring attention's striped layout: token t sits at 3 * t + 1.
        # Keys come from shard 2, so the first query (position 1) sees no key when causal.
        kw["q_positions"] = jnp.broadcast_to(3 * jnp.arange(tq, dtype=jnp.int32) + 1, (b, tq))
        kw["kv_positions"] = jnp.broadcast_to(3 * jnp.arange(tk, dtype=jnp.int32) + 2, (b, tk))
    if case.sinks:
        kw["sinks"] = jax.random.normal(keys[7], (case.heads,), jnp.float32)
    return (q, k, v), (do, dlse), kw


def _fwd_bwd(attention, qkv, cotangents, kw):
    """(o, lse) and the vjp of both at the same cotangents, in one compiled call."""

    @jax.jit
    def run(qkv, cotangents):
        out, vjp = jax.vjp(lambda *a: attention(*a, **kw), *qkv)
        return out, vjp(cotangents)

    return run(qkv, cotangents)


def _check(case: Case, seed=0):
    qkv, (do, dlse), kw = _inputs(case, seed)
    # The backward kernels get the block sizes swapped, so fwd and bwd tilings differ.
    blocks = tpu.BlockSizes(block_q=case.block_q, block_kv=case.block_kv,
                            block_q_bwd=case.block_kv, block_kv_bwd=case.block_q)
    kernel = lambda *a, **k: tpu.flash_attention_with_lse(*a, block_sizes=blocks, **k)
    ref = lambda *a, **k: reference.mha_reference(*a, return_lse=True, **k)
    args = qkv
    if case.sinks:  # differentiate the sinks too
        args = (*qkv, kw.pop("sinks"))
        kernel, ref = (lambda q, k, v, s, f=f, **kw: f(q, k, v, sinks=s, **kw)
                       for f in (kernel, ref))
    # Rows with no kept key have lse = -inf in both; give them no lse cotangent.
    _, lse_ref = ref(*args, **kw)
    dlse = jnp.where(jnp.isfinite(lse_ref), dlse, 0.0)
    (o, lse), grads = _fwd_bwd(kernel, args, (do, dlse), kw)
    (o_ref, lse_ref), grads_ref = _fwd_bwd(ref, args, (do, dlse), kw)

    chex.assert_shape(o, (case.batch, case.q_len, case.heads, case.d_v))
    chex.assert_shape(lse, (case.batch, case.heads, case.q_len))
    assert o.dtype == qkv[0].dtype and lse.dtype == jnp.float32
    for g, x in zip(grads, args, strict=True):
        assert g.shape == x.shape and g.dtype == x.dtype
    f32 = case.dtype == "float32"
    # Gradients sum over Tk (dq) or Tq * H/Hkv (dk, dv) products: scale the tolerance.
    atol, grad_atol = (1e-5, 1e-5 * case.heads) if f32 else (2e-2, 4e-2)
    chex.assert_trees_all_close(o, o_ref, atol=atol, rtol=0 if f32 else 2e-2)
    finite = jnp.isfinite(lse_ref)  # [B, H, Tq]; False on rows with no kept key
    np.testing.assert_array_equal(jnp.isfinite(lse), finite)  # same empty rows, lse -inf
    empty = ~jnp.swapaxes(finite, 1, 2)[..., None]  # [B, Tq, H, 1]
    assert not bool(jnp.any(jnp.where(empty, o, 0) != 0)), "an empty row's output is not 0"
    if case.segments == "pair" and not case.sinks:
        assert bool(empty.any()), "the case meant to have an empty row has none"
    chex.assert_trees_all_close(jnp.where(finite, lse, 0), jnp.where(finite, lse_ref, 0),
                                atol=1e-5 if f32 else 2e-2)
    names = ("dq", "dk", "dv", "dsinks")[:len(grads)]
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        assert bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))), f"{name} has NaN/inf"
        scale = max(1.0, float(jnp.abs(g_ref.astype(jnp.float32)).max()))
        chex.assert_trees_all_close(g.astype(jnp.float32), g_ref.astype(jnp.float32),
                                    atol=grad_atol * scale, rtol=0 if f32 else 2e-2,
                                    custom_message=f"{name} of {case}")
    return o, lse


# Few compilations, each combining features; every feature appears at least once.
FAST_CASES = [
    # No mask at all; lengths not a multiple of the block (40 = 2.5 blocks).
    Case(heads=2, kv_heads=2),
    # Causal, GQA 4:1, q_len != kv_len (end-aligned), qk head dim != v head dim.
    Case(causal=True, q_len=24, kv_len=40, heads=4, kv_heads=1, d_qk=24, d_v=16),
    # Causal sliding window with soft-cap; tiles of 8 x 16 (forward), 16 x 8 (backward).
    Case(causal=True, window=9, soft_cap=2.0, heads=2, kv_heads=2, block_q=8, block_kv=16),
    # Packed documents (q/kv id pair, one query fully masked), bidirectional window, GQA 8.
    Case(segments="pair", window=13, heads=8, kv_heads=1, batch=2, q_len=24, kv_len=24),
    # Ring-attention positions (strided, first row empty), attention sinks.
    Case(causal=True, positions="striped", sinks=True, kv_len=32),
    # bf16, causal, shared segment ids, GQA 4.
    Case(causal=True, segments="shared", heads=4, kv_heads=1, dtype="bfloat16"),
]


@pytest.mark.parametrize("case", FAST_CASES, ids=str)
def test_matches_reference(case):
    _check(case)


def test_ring_merge_by_lse_matches_full_attention():
    """Two halves of the keys, merged by log-sum-exp, equal attention over all of them.

    This is what ring attention does; the gradient flows through both kernel outputs.
    """
    case = Case(causal=True, q_len=24, kv_len=48, heads=2, kv_heads=1)
    (q, k, v), (do, _), _ = _inputs(case, seed=1)
    pos = jnp.arange(48, dtype=jnp.int32)[None]  # [1, 48]
    q_pos = pos[:, 24:]  # queries are the last 24 tokens

    def merged(q, k, v):
        parts = [tpu.flash_attention_with_lse(
            q, k[:, s], v[:, s], causal=True, q_positions=q_pos, kv_positions=pos[:, s],
            block_sizes=tpu.BlockSizes(8, 8)) for s in (slice(0, 24), slice(24, 48))]
        lse = jnp.logaddexp(parts[0][1], parts[1][1])  # [B, H, Tq]
        weights = [jnp.swapaxes(jnp.exp(l - lse), 1, 2)[..., None] for _, l in parts]
        return sum(w * o for w, (o, _) in zip(weights, parts, strict=True))

    full = lambda q, k, v: reference.mha_reference(q, k, v, causal=True)
    o, grads = _fwd_bwd(merged, (q, k, v), do, {})
    o_ref, grads_ref = _fwd_bwd(full, (q, k, v), do, {})
    chex.assert_trees_all_close(o, o_ref, atol=1e-5)
    chex.assert_trees_all_close(grads, grads_ref, atol=2e-5)


def test_api_dispatch_matches_reference():
    case = Case(causal=True, window=5, heads=2, kv_heads=1, q_len=20, kv_len=20)
    (q, k, v), _, kw = _inputs(case)
    o = api.flash_attention(q, k, v, impl="pallas_tpu", **kw)  # default blocks: one tile
    chex.assert_trees_all_close(o, reference.mha_reference(q, k, v, **kw), atol=1e-5)


def test_reference_gradients_are_right():
    """The gradients we compare against are themselves checked by finite differences."""
    case = Case(causal=True, window=4, soft_cap=3.0, segments="shared", q_len=8, kv_len=8,
                heads=2, kv_heads=1, d_qk=4, d_v=4, batch=1)
    qkv, _, kw = _inputs(case)
    kw["segment_ids"] = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2]])
    attention = jax.jit(lambda *a: reference.mha_reference(*a, **kw))
    check_grads(attention, qkv, order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("causal,window,segments,positions", [
    (True, None, False, False), (False, 5, False, False), (True, 7, True, False),
    (True, None, False, True), (False, None, True, True)])
def test_tile_skipping_never_drops_a_kept_pair(causal, window, segments, positions):
    """Tiles called dead hold no pair the reference mask keeps; with default causal
    positions exactly the tiles above the diagonal are dead; the in-kernel test agrees
    with the XLA one; every live tile lies in its row's clamp range."""
    b, tq, tk, bq, bkv = 2, 48, 64, 8, 16
    key = jax.random.key(3)
    q_pos, kv_pos = reference.default_positions(b, tq, tk)
    if positions:  # random increasing positions, as in striped ring attention
        kv_pos = jnp.cumsum(jax.random.randint(key, (b, tk), 1, 3), axis=1, dtype=jnp.int32)
        q_pos = kv_pos[:, tk - tq:] + 1
    q_seg = kv_seg = None
    if segments:
        kv_seg = _segments(jax.random.fold_in(key, 1), b, tk)
        q_seg = kv_seg[:, tk - tq:]
    spec = tpu_mask.MaskSpec(causal=causal, sliding_window=window, has_segments=segments,
                             has_positions=positions, q_offset=tk - tq, kv_len=tk,
                             kv_padded_len=tk)
    q_bounds = tpu_mask.block_bounds(q_pos, q_seg, bq)  # [B, nq, 4]
    kv_bounds = tpu_mask.block_bounds(kv_pos, kv_seg, bkv)  # [B, nk, 4]
    live = np.asarray(tpu_mask.tile_liveness(spec, q_bounds, kv_bounds))  # [B, nq, nk]

    mask = reference.attention_mask(b, tq, tk, causal=causal, sliding_window=window,
                                    q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                                    q_positions=q_pos, kv_positions=kv_pos)[:, 0]
    tiles = np.asarray(mask.reshape(b, tq // bq, bq, tk // bkv, bkv).any(axis=(2, 4)))
    assert not np.any(tiles & ~live), "a tile with kept pairs was skipped"
    assert np.any(~live), "nothing skipped"
    if causal and window is None and not segments and not positions:
        np.testing.assert_array_equal(live, tiles)

    for bi, i, j in itertools.product(*map(range, live.shape)):  # the kernel's scalar path
        assert live[bi, i, j] == tpu_mask.block_is_live(
            spec, q_bounds.reshape(-1), kv_bounds.reshape(-1), batch=bi, q_block=i,
            kv_block=j, num_q_blocks=tq // bq, num_kv_blocks=tk // bkv)
    ranges = np.asarray(tpu_mask.live_range(live))  # [B, nq, 2]
    index = np.arange(live.shape[2])
    inside = (index >= ranges[..., :1]) & (index <= ranges[..., 1:])
    assert not np.any(live & ~inside)


@pytest.mark.parametrize("features", ["causal", "segments-softcap-sinks", "positions-window",
                                      "mla-dims"])
def test_lowers_to_mosaic_for_tpu(features):
    """Interpret mode accepts things Mosaic rejects; lower (no TPU needed) with real tiles.

    Traces forward and backward for a TPU target: all three kernels must become Mosaic
    custom calls. (The last compilation step, in libtpu, is not run here.)
    """
    b, t, h, hkv = 1, 256, 4, 2
    d_qk, d_v = (192, 128) if features == "mla-dims" else (128, 128)
    q = jax.ShapeDtypeStruct((b, t, h, d_qk), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((b, t, hkv, d_qk), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((b, t, hkv, d_v), jnp.bfloat16)
    ints = jax.ShapeDtypeStruct((b, t), jnp.int32)
    sinks = jax.ShapeDtypeStruct((h,), jnp.float32)

    def loss(q, k, v, ints, sinks):
        kw = dict(causal=True)
        if features == "segments-softcap-sinks":
            kw.update(segment_ids=ints, logit_soft_cap=30.0, sinks=sinks)
        if features == "positions-window":
            kw.update(q_positions=ints, kv_positions=ints, sliding_window=64, causal=False)
        o, lse = tpu.flash_attention_with_lse(q, k, v, interpret=False, **kw)
        return o.astype(jnp.float32).sum() + jnp.where(jnp.isfinite(lse), lse, 0.0).sum()

    device = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
    with jax.sharding.use_abstract_mesh(
            jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(
            q, k, v, ints, sinks).lower(lowering_platforms=("tpu",))
    assert lowered.as_text().count("tpu_custom_call") == 3  # forward, dq, dk/dv


def test_bad_input_raises_value_error():
    (q, k, v), _, _ = _inputs(Case())
    with pytest.raises(ValueError, match="block_q"):
        tpu.BlockSizes(block_q=12)
    with pytest.raises(ValueError, match="block_kv_bwd"):
        tpu.BlockSizes(block_kv_bwd=0)
    with pytest.raises(ValueError, match="q_positions"):
        pos = jnp.zeros((1, 40), jnp.float32)
        tpu.flash_attention_tpu(q, k, v, causal=True, q_positions=pos, kv_positions=pos)
    with pytest.raises(ValueError, match="logit_soft_cap"):
        tpu.flash_attention_tpu(q, k, v, logit_soft_cap=-1.0)
    with pytest.raises(ValueError, match="block_sizes"):
        tpu.flash_attention_tpu(q, k, v, block_sizes=(16, 16))
    with pytest.raises(ValueError, match="divisible"):
        tpu.flash_attention_tpu(q[:, :, :1], k[:, :, :1].repeat(2, axis=2),
                                v[:, :, :1].repeat(2, axis=2))
    with pytest.raises(ValueError, match="sliding_window"):
        tpu.flash_attention_tpu(q, k, v, sliding_window=0)
    with pytest.raises(ValueError, match="segment_ids"):
        tpu.flash_attention_tpu(q, k, v, segment_ids=jnp.ones((1, 39), jnp.int32))
    with pytest.raises(ValueError, match="block_kv"):  # compiled TPU tiling rules
        tpu.flash_attention_tpu(q, k, v, block_sizes=tpu.BlockSizes(16, 16), interpret=False)


_MASKS = [  # (causal, window, soft_cap, segments)
    (False, None, None, None), (True, None, None, None), (True, 6, None, "shared"),
    (False, 11, 5.0, None), (True, None, 1.0, "shared")]
SLOW_CASES = [
    # Every mask with GQA ratios 1, 4, 8; dtypes and q_len alternate along the list.
    Case(causal=causal, window=window, soft_cap=cap, segments=seg, heads=heads, kv_heads=1,
         dtype=("float32", "bfloat16")[i % 2], q_len=40 if seg or (i // 2) % 2 else 17,
         kv_len=40, block_q=8, block_kv=16)
    for i, ((causal, window, cap, seg), heads) in enumerate(itertools.product(_MASKS, (1, 4, 8)))
] + [
    Case(d_qk=192, d_v=128, causal=True, q_len=136, kv_len=136, heads=2, kv_heads=1,
         block_q=128, block_kv=128),
    Case(causal=True, positions="striped", segments="pair", sinks=True, heads=4, kv_heads=2),
    Case(batch=3, causal=True, q_len=64, kv_len=64, block_q=32, block_kv=32, dtype="bfloat16",
         segments="shared", heads=4, kv_heads=2),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=str)
def test_matches_reference_wide(case):
    _check(case, seed=1)
