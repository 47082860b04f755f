"""Mamba-2 layers (arch/ssm.py) and hybrid models: packing, decoding, configs.

A packed row of documents must give each document what it gets alone (neither the conv
nor the SSD crosses a segment change); decoding with an SSM state cache, a ragged
prefill then one token at a time, must give the full forward pass's logits.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arch import build_model
from arch.ssm import causal_conv
from configs.base import ssm_defaults
from configs.hybrid import get_config
from serving.cache import init_cache


def tiny_cfg(arch="nemotron_h", **model):
    cfg = get_config(f"tiny,arch={arch}").model
    cfg.update(d_model=32, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64, max_seq_len=64,
               init_std=0.1, **model)
    cfg.ssm.update(d_state=8, head_dim=16, n_groups=2, chunk_size=8)
    return cfg


@pytest.fixture(scope="module")
def hybrid():
    """A Mamba-2 mixer, attention without positions, a feed-forward alone
    (model.block_mlp=False, as Nemotron-H), and its jitted full forward pass."""
    cfg = tiny_cfg(num_layers=3, layer_pattern=("mamba", "nope", "mlp"))
    model = build_model(cfg, nnx.Rngs(params=0))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, t, seg: nnx.merge(graphdef, s)(t, segment_ids=seg)[0])
    return cfg, graphdef, state, forward


def test_packed_documents_equal_documents_alone(hybrid):
    """Row 0 packs two documents and padding; rows 1 and 2 hold each document alone:
    every document gets the same logits (the conv, the SSD and attention all stop at
    segment changes)."""
    cfg, _, state, forward = hybrid
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (1, 20), 0, cfg.vocab_size))
    rows = np.zeros((3, 20), np.int32)
    rows[0], rows[1, :9], rows[2, :8] = tokens[0], tokens[0, :9], tokens[0, 9:17]
    seg = np.array([[1] * 9 + [2] * 8 + [0] * 3, [1] * 9 + [0] * 11, [1] * 8 + [0] * 12])
    logits = forward(state, jnp.asarray(rows), jnp.asarray(seg))
    np.testing.assert_allclose(logits[0, :9], logits[1, :9], atol=2e-5)
    np.testing.assert_allclose(logits[0, 9:17], logits[2, :8], atol=2e-5)


def test_causal_conv_taps_stay_in_their_segment():
    u = jnp.arange(1.0, 7.0)[None, :, None]                              # [1, 6, 1]
    w = jnp.array([[1000.0], [100.0], [10.0], [1.0]])                    # taps t-3 .. t
    seq = jnp.array([[0, 0, 0, 1, 1, 1]])
    out = causal_conv(u, w, jnp.zeros((1,)), seq=seq)[0, :, 0]
    # Token 3 (a new segment) sees only itself; token 2 sees 0, 1, 2.
    np.testing.assert_allclose(out, [1, 12, 123, 4, 45, 456])


def test_decoding_with_state_cache_equals_full_forward(hybrid):
    """Prefill (ragged: row 1 has 4 valid tokens, then padding; row 2 none, an idle slot)
    and decode one token at a time; every logit equals the full forward pass's."""
    cfg, graphdef, state, forward = hybrid
    tokens = jax.random.randint(jax.random.key(2), (3, 20), 0, cfg.vocab_size)
    full = forward(state, tokens, jnp.ones((3, 20), jnp.int32))

    @jax.jit
    def call(s, t, cache, seg):
        logits, aux = nnx.merge(graphdef, s)(t, cache=cache, segment_ids=seg)
        return logits, aux["cache"]

    n = jnp.array([[7], [4], [0]])
    seg = (jnp.arange(7)[None] < n).astype(jnp.int32)
    logits, cache = call(state, tokens[:, :7] * seg, init_cache(cfg, 3, 32), seg)
    np.testing.assert_allclose(logits[0], full[0, :7], atol=2e-5)
    np.testing.assert_allclose(logits[1, :4], full[1, :4], atol=2e-5)
    pos = np.array([7, 4, 0])
    one = jnp.ones((3, 1), jnp.int32)
    for _ in range(8):
        logits, cache = call(state, tokens[np.arange(3), pos][:, None], cache, one)
        np.testing.assert_allclose(logits[:, 0], full[np.arange(3), pos], atol=2e-5)
        pos = pos + 1
    assert [np.asarray(c.lengths).tolist() for c in cache] == [pos.tolist()] * 3


def test_bad_ssm_config_names_the_field():
    def build(**ssm):
        cfg = tiny_cfg(num_layers=1, layer_pattern=("mamba",))
        cfg.ssm.update(**ssm)
        return build_model(cfg, 0)

    with pytest.raises(ValueError, match="model.ssm.head_dim=24 must divide"):
        build(head_dim=24)
    with pytest.raises(ValueError, match="model.ssm.n_groups=3"):
        build(n_groups=3)
    with pytest.raises(ValueError, match="model.ssm.norm_groups=3"):
        build(norm_groups=3)
    with pytest.raises(ValueError, match="model.ssm.d_state=0"):
        build(d_state=0)
    with pytest.raises(ValueError, match="model.ssm.impl"):
        build(impl="cuda")
    with pytest.raises(ValueError, match="model.ssm.chunk_size=24 must be a power of two"):
        build(impl="pallas_gpu", chunk_size=24)
    cfg = tiny_cfg(num_layers=1, layer_pattern=("mamba",))
    cfg.ssm = None
    with pytest.raises(ValueError, match="model.ssm is None"):
        build_model(cfg, 0)
    cfg = tiny_cfg(num_layers=1, layer_pattern=("mamba",), track_max_logits=True)
    with pytest.raises(ValueError, match="track_max_logits"):
        build_model(cfg, 0)
    cfg = tiny_cfg(num_layers=1, layer_pattern=("mamba",), causal=False)
    with pytest.raises(ValueError, match="model.causal=False"):
        build_model(cfg, 0)
    cfg = tiny_cfg(num_layers=2, layer_pattern=("mamba", "lstm"))
    with pytest.raises(ValueError, match="layer_pattern entry"):
        build_model(cfg, 0)
    with pytest.raises(ValueError, match="kind='paged'"):
        init_cache(tiny_cfg(), 1, 16, kind="paged")
    assert set(ssm_defaults()) == {"d_state", "d_conv", "expand", "head_dim", "n_groups",
                                   "norm_groups", "chunk_size", "impl"}


def test_hybrid_config_variants():
    with pytest.raises(ValueError, match="variant"):
        get_config("huge")
    with pytest.raises(ValueError, match="arch='rwkv'"):
        get_config("tiny,arch=rwkv")
    m = get_config("full,arch=nemotron_h").model
    kinds = [m.layer_pattern[i % len(m.layer_pattern)] for i in range(m.num_layers)]
    assert (kinds.count("mamba"), kinds.count("mlp"), kinds.count("nope")) == (24, 24, 4)
