"""Ring / striped attention on 8 emulated CPU devices against full attention.

The reference is `mha_reference` over the whole sequence on one device (plain jnp,
itself checked with `check_grads` below and against numpy in test_attention_reference).
"""
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

from pallas_kernels.flash_attention.reference import attention_mask, mha_reference
from pallas_kernels.ring_attention import (
    from_layout,
    layout_positions,
    ring_attention,
    ring_attention_in_layout,
    ring_attention_shard,
    tile_counts,
    to_layout,
)
from pallas_kernels.ring_attention.block import BlockConfig, block_is_live

TOL = dict(atol=1e-5, rtol=1e-5)


def auto_mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


@pytest.fixture(scope="module")
def mesh8():
    return auto_mesh((8,), ("sequence",))


def qkv(b=2, t=64, h=4, hkv=2, d=8, dtype=jnp.float32, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (b, t, h, d), dtype), jax.random.normal(kk, (b, t, hkv, d), dtype),
            jax.random.normal(kv, (b, t, hkv, d), dtype))


def packed_segments(b, t):
    """Documents of uneven lengths that cross device boundaries (T/8 = 8 tokens a device)."""
    lengths = [13, 22, 5, t - 40]
    row = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])
    rows = np.stack([row, np.roll(row, 3)])[:b]  # second row: other boundaries
    return jnp.asarray(rows, jnp.int32)


def values_and_grads(attn, q, k, v, sinks=None):
    """attn's output and the gradients of a nonlinear scalar of it, in one compile."""
    w = jax.random.normal(jax.random.key(7), q.shape[:3] + (v.shape[3],), jnp.float32)

    def loss(q, k, v, sinks):
        o = attn(q, k, v, sinks)
        return jnp.sum(jnp.sin(o.astype(jnp.float32)) * w), o

    argnums = (0, 1, 2) if sinks is None else (0, 1, 2, 3)
    (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(q, k, v, sinks)
    return o, grads


CASES = [  # layout, causal, sliding_window, with segments
    ("striped", True, None, True),
    ("contiguous", True, None, True),
    ("striped", False, None, True),
    ("contiguous", False, 11, False),
    ("striped", True, 9, True),
]


@pytest.mark.parametrize("layout,causal,window,segments", CASES)
def test_matches_full_attention(mesh8, layout, causal, window, segments):
    q, k, v = qkv()
    seg = packed_segments(2, 64) if segments else None
    kw = dict(causal=causal, sliding_window=window, segment_ids=seg)
    ring = lambda q, k, v, _: ring_attention(q, k, v, mesh=mesh8, layout=layout, impl="reference", **kw)
    full = lambda q, k, v, _: mha_reference(q, k, v, **kw)
    o, g = values_and_grads(ring, q, k, v)
    o_ref, g_ref = values_and_grads(full, q, k, v)
    chex.assert_shape(o, q.shape)
    chex.assert_trees_all_close(o, o_ref, **TOL)
    chex.assert_trees_all_close(g, g_ref, **TOL)


def test_sinks_soft_cap_scale_and_batch_over_data():
    """Batch over `data`, heads over `tensor`, ring of 2; sinks get their gradient too."""
    mesh = auto_mesh((2, 2, 2), ("data", "tensor", "sequence"))
    q, k, v = qkv(b=2, t=32, h=4, hkv=2)
    sinks = jnp.array([0.5, -1.0, 2.0, 0.0])
    kw = dict(causal=True, logit_soft_cap=3.0, sm_scale=0.4)
    ring = lambda q, k, v, s: ring_attention(q, k, v, mesh=mesh, sinks=s, impl="reference", **kw)
    full = lambda q, k, v, s: mha_reference(q, k, v, sinks=s, **kw)
    chex.assert_trees_all_close(values_and_grads(ring, q, k, v, sinks),
                                values_and_grads(full, q, k, v, sinks), **TOL)


def test_bfloat16(mesh8):
    q, k, v = qkv(dtype=jnp.bfloat16)
    o = jax.jit(lambda q, k, v: ring_attention(q, k, v, mesh=mesh8, causal=True, impl="reference"))(q, k, v)
    ref = mha_reference(*(x.astype(jnp.float32) for x in (q, k, v)), causal=True)
    assert o.dtype == jnp.bfloat16
    chex.assert_trees_all_close(o.astype(jnp.float32), ref, atol=3e-2, rtol=3e-2)


def test_reference_gradients_are_right():
    """The reference itself, against finite differences (so comparing to it means something)."""
    q, k, v = qkv(b=1, t=8, h=2, hkv=1, d=4)
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2]])
    f = jax.jit(lambda q, k, v: mha_reference(q, k, v, causal=True, sliding_window=3, segment_ids=seg))
    check_grads(f, (q, k, v), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


# ----------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("stripe", [1, 2])
def test_striped_layout_puts_token_t_on_device_t_mod_n(stripe):
    n, t = 4, 16
    x = np.arange(t)[None]
    shards = to_layout(x, n, "striped", stripe=stripe)[0].reshape(n, t // n)  # device d's tokens
    for d in range(n):
        expected = [tok for tok in range(t) if (tok // stripe) % n == d]  # brute force
        np.testing.assert_array_equal(shards[d], expected)
    np.testing.assert_array_equal(from_layout(to_layout(x, n, "striped", stripe=stripe), n, "striped",
                                              stripe=stripe), x)
    np.testing.assert_array_equal(layout_positions(t, n, "striped", stripe), shards.reshape(-1))
    np.testing.assert_array_equal(to_layout(x, n, "contiguous"), x)


def test_block_liveness_is_sound():
    """A block judged dead has no unmasked pair (brute force), on random blocks."""
    rng = np.random.default_rng(0)
    dead = 0
    for trial in range(60):
        causal = bool(trial % 2)
        window = [None, 3, 8][trial % 3]
        block = lambda lo, span: np.sort(rng.integers(lo, lo + span, (1, 6)), axis=1)
        qp, kp = block(rng.integers(0, 30), 10), block(rng.integers(0, 30), 10)
        qs, ks = block(rng.integers(1, 4), 2), block(rng.integers(1, 4), 2)
        cfg = BlockConfig(impl="reference", causal=causal, sliding_window=window)
        any_pair = np.asarray(attention_mask(1, 6, 6, causal=causal, sliding_window=window,
                                             q_segment_ids=qs, kv_segment_ids=ks,
                                             q_positions=qp, kv_positions=kp)).any()
        live = bool(block_is_live(qp, kp, qs, ks, cfg))
        assert live or not any_pair, (qp, kp, qs, ks, causal, window)
        dead += not live
    assert dead > 5  # the test exercised skipping


def test_work_balance_causal_n8():
    n, t, block = 8, 1024, 16
    striped = tile_counts(t, n, "striped", block=block, causal=True)
    contiguous = tile_counts(t, n, "contiguous", block=block, causal=True)
    assert striped.max() / striped.mean() <= 1.1
    nb = t // n // block  # tiles per block edge
    # By hand. Contiguous: device d has d full past blocks and one triangle of its own.
    np.testing.assert_array_equal(contiguous, [d * nb * nb + nb * (nb + 1) // 2 for d in range(n)])
    # Striped: every one of the n blocks is a triangle including its diagonal tiles
    # (local query i meets local key j of any device when j < i), on every device.
    np.testing.assert_array_equal(striped, [n * nb * (nb + 1) // 2] * n)
    assert contiguous.max() / contiguous.mean() > 1.7  # the imbalance striping removes


# ----------------------------------------------------------------------------- the compiled step
def test_sharded_step_rotates_and_never_gathers(mesh8):
    b, t = 1, 64
    q, k, v = qkv(b=b, t=t)
    sh = NamedSharding(mesh8, P(None, "sequence"))
    q, k, v = (jax.device_put(to_layout(x, 8, "striped"), sh) for x in (q, k, v))
    pos = jax.device_put(jnp.asarray(layout_positions(t, 8, "striped", batch=b)), sh)

    def loss(q, k, v):
        o = ring_attention_in_layout(q, k, v, mesh=mesh8, positions=pos, causal=True, impl="reference")
        return jnp.sum(o)

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()
    assert "collective-permute" in hlo
    assert not re.search(r"all-gather|all-to-all", hlo)


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs(mesh8):
    q, k, v = qkv(t=60)
    with pytest.raises(ValueError, match="sequence length 60"):
        ring_attention(q, k, v, mesh=mesh8, layout="contiguous")
    q, k, v = qkv(t=64)
    with pytest.raises(ValueError, match="stripe=16"):
        ring_attention(q, k, v, mesh=mesh8, layout="striped", stripe=16)
    with pytest.raises(ValueError, match="axis_name='context'"):
        ring_attention(q, k, v, mesh=mesh8, axis_name="context")
    with pytest.raises(ValueError, match="layout='zigzag'"):
        ring_attention(q, k, v, mesh=mesh8, layout="zigzag")
    with pytest.raises(ValueError, match="impl='cudnn'"):
        ring_attention(q, k, v, mesh=mesh8, impl="cudnn")
    with pytest.raises(ValueError, match="batch 2"):
        ring_attention(q, k, v, mesh=auto_mesh((4, 2), ("data", "sequence")))
    pos = jnp.zeros(q.shape[:2], jnp.int32)
    with pytest.raises(ValueError, match="axis_name='sequence'"):  # not inside shard_map
        ring_attention_shard(q, k, v, pos, pos, causal=True)


# ----------------------------------------------------------------------------- kernel workers
def _kernel_worker_case(impl, block_sizes):
    mesh = auto_mesh((4,), ("sequence",))
    q, k, v = qkv(b=1, t=64, h=2, hkv=1, d=16)
    seg = packed_segments(1, 64)
    kw = dict(causal=True, segment_ids=seg)
    ring = lambda q, k, v, _: ring_attention(q, k, v, mesh=mesh, impl=impl, block_sizes=block_sizes, **kw)
    full = lambda q, k, v, _: mha_reference(q, k, v, **kw)
    chex.assert_trees_all_close(values_and_grads(ring, q, k, v), values_and_grads(full, q, k, v),
                                atol=2e-5, rtol=2e-5)


@pytest.mark.slow
def test_pallas_gpu_worker_interpret():
    from pallas_kernels.flash_attention import gpu
    _kernel_worker_case("pallas_gpu", gpu.BlockSizes(block_q=16, block_k=16, block_q_dkv=16,
                                                     block_kv_dkv=16, block_q_dq=16, block_kv_dq=16))


@pytest.mark.slow
def test_pallas_tpu_worker_interpret():
    from pallas_kernels.flash_attention import tpu
    _kernel_worker_case("pallas_tpu", tpu.BlockSizes(block_q=16, block_kv=16, block_q_bwd=16,
                                                     block_kv_bwd=16))
