"""Model assembly: list vs scan, remat, packing, placements, parameter counts, errors."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from arch import build_model, count_params
from arch.block import Block
from configs.base import model_defaults
from configs.llama3 import get_config as llama3


def tiny(**overrides):
    c = model_defaults()
    c.update(overrides)
    return c


def tokens(b=2, t=12, vocab=256, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, vocab)


def test_scan_equals_list():
    cfg = tiny(num_layers=3)
    listed = build_model(cfg, 0)
    cfg.scan_layers = True
    scanned = build_model(cfg, 1)
    # Stack the list model's per-layer parameters onto the scanned model's layer axis.
    layer_states = [nnx.to_pure_dict(nnx.state(b, nnx.Param)) for b in listed.stack.layers]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layer_states)
    state = nnx.state(scanned.stack.layers, nnx.Param)
    nnx.replace_by_pure_dict(state, stacked)
    nnx.update(scanned.stack.layers, state)
    for name in ("embed", "final_norm", "lm_head"):
        nnx.update(getattr(scanned, name), nnx.state(getattr(listed, name)))
    t = tokens()
    chex.assert_trees_all_close(scanned(t)[0], listed(t)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_keeps_values_and_grads(policy):
    t = tokens()
    plain = build_model(tiny(), 0)
    remat = build_model(tiny(remat=policy), 0)
    loss = lambda m: jnp.mean(m(t)[0] ** 2)
    chex.assert_trees_all_close(nnx.grad(loss)(remat), nnx.grad(loss)(plain), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pattern", [("global",), ("local", "global"), ("chunked", "nope")])
def test_packed_documents_equal_separate_runs(pattern):
    """Two documents packed in one row with segment ids and restarted positions give the
    logits each document gives alone."""
    cfg = tiny(layer_pattern=pattern, sliding_window=3, chunk_size=4, num_layers=2)
    model = build_model(cfg, 0)
    a, b = tokens(1, 7, seed=1), tokens(1, 5, seed=2)
    packed = jnp.concatenate([a, b, jnp.zeros((1, 2), jnp.int32)], axis=1)
    seg = jnp.array([[1] * 7 + [2] * 5 + [0] * 2])
    pos = jnp.array([list(range(7)) + list(range(5)) + [0, 0]])
    logits, _ = model(packed, positions=pos, segment_ids=seg)
    chex.assert_trees_all_close(logits[:, :7], model(a)[0], atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(logits[:, 7:12], model(b)[0], atol=1e-5, rtol=1e-5)


def test_causal_decoder_and_bidirectional_encoder():
    t = tokens(1, 8)
    t2 = t.at[0, -1].set((t[0, -1] + 1) % 256)
    dec = build_model(tiny(), 0)
    chex.assert_trees_all_close(dec(t)[0][:, :-1], dec(t2)[0][:, :-1], atol=1e-6)
    enc = build_model(tiny(kind="encoder", causal=False), 0)
    assert not np.allclose(enc(t)[0][:, 0], enc(t2)[0][:, 0], atol=1e-6)


def test_encoder_decoder_reads_the_encoder():
    model = build_model(tiny(kind="encoder_decoder", num_encoder_layers=2), 0)
    dec_in, enc_a = tokens(1, 6, seed=3), tokens(1, 9, seed=4)
    enc_b = enc_a.at[0, 0].set((enc_a[0, 0] + 7) % 256)
    out_a = model(dec_in, encoder_tokens=enc_a)[0]
    out_b = model(dec_in, encoder_tokens=enc_b)[0]
    assert out_a.shape == (1, 6, 256)
    assert not np.allclose(out_a, out_b, atol=1e-6)  # every decoder position sees the whole encoder


def _manual_block(block, x, pos, placement):
    """The placement formulas of arch/norms.py written out with the block's own sub-layers."""
    attn = lambda h: block.attn(h, positions=pos)[0]
    if placement == "pre":
        x = x + attn(block.attn_norm(x))
        return x + block.mlp(block.mlp_norm(x))
    if placement == "post":
        x = block.attn_norm(x + attn(x))
        return block.mlp_norm(x + block.mlp(x))
    if placement == "sandwich":
        x = x + block.post_attn_norm(attn(block.attn_norm(x)))
        return x + block.post_mlp_norm(block.mlp(block.mlp_norm(x)))
    x = x + block.post_attn_norm(attn(x))  # olmo2
    return x + block.post_mlp_norm(block.mlp(x))


@pytest.mark.parametrize("placement", ["pre", "post", "sandwich", "olmo2"])
def test_norm_placements(placement):
    cfg = tiny(norm_placement=placement)
    block = Block(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, cfg.d_model))
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    chex.assert_trees_all_close(block(x, positions=pos)[0], _manual_block(block, x, pos, placement),
                                atol=1e-6)


def test_count_params_matches_built_model_and_ties_once():
    for tie in (False, True):
        cfg = tiny(tie_embeddings=tie, qk_norm=True, attn_bias=True)
        model = build_model(cfg, 0)
        built = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        assert count_params(cfg) == (built, built)
    untied, _ = count_params(tiny())
    tied, _ = count_params(tiny(tie_embeddings=True))
    assert untied - tied == 256 * 64  # the head is the embedding table, counted once


# 405b is held in tests/arch/test_families.py (counting it takes ~17 s on CPU).
@pytest.mark.parametrize("size,published", [("8b", 8.03e9), ("70b", 70.6e9)])
def test_llama3_published_counts(size, published):
    total, active = count_params(llama3(f"full,size={size}").model)
    assert abs(total - published) / published < 0.01 and active == total


def test_tiny_llama_memorises():
    cfg = llama3("tiny").model
    model = build_model(cfg, 0)
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    batch = tokens(4, 33, seed=5)

    @nnx.jit
    def step(model, opt):
        def loss_fn(m):
            logits, _ = m(batch[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(20)]
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("field,value,match", [
    ("num_kv_heads", 3, "num_heads"),
    ("norm", "batchnorm", "model.norm"),
    ("activation", "tanh", "model.activation"),
    ("norm_placement", "middle", "norm_placement"),
    ("kind", "rnn", "model.kind"),
    ("remat", "some", "model.remat"),
    ("attention_impl", "fast", "attention_impl"),
    ("layer_pattern", ("global", "dilated"), "layer_pattern"),
])
def test_bad_config_fails_at_construction(field, value, match):
    with pytest.raises(ValueError, match=match):
        build_model(tiny(**{field: value}), 0)


def test_window_and_scan_errors():
    with pytest.raises(ValueError, match="sliding_window"):
        build_model(tiny(layer_pattern=("local",), sliding_window=10_000), 0)
    with pytest.raises(ValueError, match="scan_layers"):
        build_model(tiny(layer_pattern=("local", "global"), sliding_window=4, scan_layers=True), 0)
    model = build_model(tiny(max_seq_len=8), 0)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(1, 9))
