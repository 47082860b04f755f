"""Sequence parallelism: batch layouts, the ring switch, and a tiny Llama trained with
mesh.sequence = 8 that follows the single-device run step by step."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from arch import build_model
from configs.base import model_defaults
from pallas_kernels.flash_attention import mha_reference
from sharding import sequence


def auto_mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


# ----------------------------------------------------------------------------- batches
def test_batch_to_layout_moves_everything_together():
    b, t, n = 2, 16, 4
    tokens = np.arange(b * t).reshape(b, t)
    batch = {"tokens": tokens, "targets": tokens + 1, "segment_ids": tokens // 5, "step": np.int32(3)}
    out = sequence.batch_to_layout(batch, n, "striped")
    # Slot i of the layout holds natural token positions[:, i]: every entry agrees.
    pos = out["positions"]
    np.testing.assert_array_equal(pos[0], [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15])
    rows = np.arange(b)[:, None]
    for key in ("tokens", "targets", "segment_ids"):
        np.testing.assert_array_equal(out[key], batch[key][rows, pos])
    assert out["step"] == 3
    back = sequence.batch_from_layout(out, n, "striped")
    for key in ("tokens", "targets", "segment_ids"):
        np.testing.assert_array_equal(back[key], batch[key])
    # Given positions (packed documents) are permuted, not replaced.
    doc_pos = tokens % 5
    out = sequence.batch_to_layout({"tokens": tokens, "positions": doc_pos}, n, "striped")
    np.testing.assert_array_equal(out["positions"], doc_pos[rows, pos])
    with pytest.raises(ValueError, match="layout='diagonal'"):
        sequence.batch_to_layout(batch, n, "diagonal")
    with pytest.raises(ValueError, match="sequence length 16"):
        sequence.batch_to_layout(batch, 3, "contiguous")


# ----------------------------------------------------------------------------- the switch
def test_ring_switch():
    mesh = auto_mesh((2, 4), ("data", "sequence"))
    assert sequence.active() is None and sequence.attention_impl("auto") == "auto"
    with sequence.sequence_parallel(mesh, impl="reference") as sp:
        assert sequence.active() == sp and sequence.attention_impl("auto") == "ring"
    with jax.set_mesh(mesh):  # a mesh with sequence > 1 turns it on by itself
        assert sequence.attention_impl("pallas_tpu") == "ring"
    with jax.set_mesh(auto_mesh((8, 1), ("data", "sequence"))):
        assert sequence.attention_impl("pallas_tpu") == "pallas_tpu"
    with pytest.raises(ValueError, match="axis_name='ctx'"):
        with sequence.sequence_parallel(mesh, axis_name="ctx"):
            pass
    with pytest.raises(ValueError, match="impl='flash'"):
        with sequence.sequence_parallel(mesh, impl="flash"):
            pass
    with pytest.raises(ValueError, match="needs a mesh"):
        q = jnp.zeros((1, 8, 2, 4))
        sequence.ring_backend(q, q, q, causal=True)


def test_ring_backend_on_a_layout_batch():
    """Global arrays in striped order with their positions == full attention, permuted."""
    mesh = auto_mesh((2, 4), ("data", "sequence"))
    b, t, n = 2, 32, 4
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(kq, (b, t, 4, 8))
    k, v = jax.random.normal(kk, (b, t, 2, 8)), jax.random.normal(kv, (b, t, 2, 8))
    seg = jnp.asarray(np.repeat([[1] * 11 + [2] * 21], b, 0), jnp.int32)
    lay = sequence.batch_to_layout({"q": q, "k": k, "v": v, "seg": seg}, n, "striped")

    with sequence.sequence_parallel(mesh, impl="reference"):
        o = jax.jit(lambda d: sequence.ring_backend(
            d["q"], d["k"], d["v"], causal=True, sliding_window=7, segment_ids=d["seg"],
            q_positions=d["positions"], kv_positions=d["positions"]))(lay)
    ref = mha_reference(q, k, v, causal=True, sliding_window=7, segment_ids=seg)
    chex.assert_trees_all_close(sequence.from_layout(o, n, "striped"), ref, atol=1e-5, rtol=1e-5)



def tiny_llama():
    m = model_defaults()
    m.vocab_size, m.d_model, m.num_layers, m.mlp_dim = 64, 32, 2, 64
    m.num_heads, m.num_kv_heads, m.head_dim, m.max_seq_len = 4, 2, 8, 64
    m.attention_impl = "reference"
    return m


def packed_batch(b=2, t=64, seed=0):
    """Two rows of packed documents (lengths cross the 8-token device boundaries)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 64, (b, t + 1))
    lengths = [[19, 30, 15], [7, 40, 17]]
    seg = np.stack([np.repeat(np.arange(1, 4), ls) for ls in lengths]).astype(np.int32)
    pos = np.stack([np.concatenate([np.arange(n) for n in ls]) for ls in lengths]).astype(np.int32)
    return {"tokens": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
            "segment_ids": seg, "positions": pos,
            "loss_mask": (np.roll(seg, -1, axis=1) == seg).astype(np.float32)}


def train_losses(batch, steps=3):
    model = build_model(tiny_llama(), rngs=0)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, batch):
        def loss_fn(model):
            logits, _ = model(batch["tokens"], positions=batch["positions"],
                              segment_ids=batch["segment_ids"])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
            return jnp.sum(ce * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    return np.array([step(model, optimizer, batch) for _ in range(steps)])


def test_tiny_llama_through_the_arch_hook():
    """A tiny Llama trains with sequence=8 (striped) with the losses of one device."""
    batch = packed_batch(seed=1)
    expected = train_losses({k: jnp.asarray(v) for k, v in batch.items()})
    mesh = auto_mesh((8,), ("sequence",))
    lay = sequence.batch_to_layout(batch, 8, "striped")
    lay = {k: jax.device_put(v, NamedSharding(mesh, P(None, "sequence"))) for k, v in lay.items()}
    with sequence.sequence_parallel(mesh, impl="reference"):
        got = train_losses(lay)
    assert np.all(np.diff(expected) < 0)  # it trains
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
