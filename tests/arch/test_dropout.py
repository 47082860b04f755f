"""Dropout (arch/dropout.py): off unless the training step turns it on, masks that move on
every step and resume exactly, and config errors that name the field."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import arch
from arch.dropout import with_dropout
from configs.gpt2 import get_config
from trainer.sample import generate


def _cfg(dropout=0.2, attention_dropout=None, **model):
    cfg = get_config("tiny")
    cfg.model.update(d_model=32, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=16,
                     mlp_dim=64, max_seq_len=32, dropout=dropout,
                     attention_dropout=attention_dropout, **model)
    return cfg


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)


def test_dropout_model_is_the_plain_model_until_training():
    """Same seeds: the dropout model has the plain model's parameters and, outside
    training, its exact outputs (the reference is the model built with dropout 0)."""
    plain = arch.build_model(_cfg(0.0).model, nnx.Rngs(params=0, dropout=1))
    drop = arch.build_model(_cfg(0.3).model, nnx.Rngs(params=0, dropout=1))
    np.testing.assert_array_equal(plain(TOKENS)[0], drop(TOKENS)[0])
    np.testing.assert_array_equal(drop(TOKENS)[0], drop(TOKENS)[0])
    ids = generate(drop, [1, 2, 3], max_new_tokens=4)
    np.testing.assert_array_equal(ids, generate(plain, [1, 2, 3], max_new_tokens=4))


@pytest.mark.parametrize("scan", [False, True], ids=["list", "scan"])
def test_training_view_drops_with_fresh_masks_per_call(scan):
    model = arch.build_model(_cfg(0.3, scan_layers=scan).model, nnx.Rngs(params=0, dropout=1))
    clean = model(TOKENS)[0]
    train = with_dropout(model, True)
    a, b = train(TOKENS)[0], train(TOKENS)[0]
    assert not np.allclose(a, clean) and not np.allclose(a, b)
    np.testing.assert_array_equal(model(TOKENS)[0], clean)   # the model itself stays off


def test_embedding_dropout_keeps_the_expected_fraction_scaled():
    """Against the definition: each unit zeroed with p, the rest scaled by 1/(1-p)."""
    model = arch.build_model(_cfg(0.25, attention_dropout=0.0).model, nnx.Rngs(params=0, dropout=1))
    tokens = jnp.zeros((64, 32), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(32), (64, 32))
    clean = model.embed_tokens(tokens, pos)
    dropped = with_dropout(model, True).embed_tokens(tokens, pos)
    kept = dropped != 0
    assert abs(float(jnp.mean(kept)) - 0.75) < 0.01
    np.testing.assert_allclose(dropped[kept], (clean / 0.75)[kept], rtol=1e-6)


def test_attention_dropout_alone_changes_the_output():
    model = arch.build_model(_cfg(0.0, attention_dropout=0.5).model, nnx.Rngs(params=0, dropout=1))
    clean = model(TOKENS)[0]
    assert not np.allclose(with_dropout(model, True)(TOKENS)[0], clean)


def test_dropout_streams_advance_in_the_train_step_and_eval_is_deterministic():
    import optim
    from data.packing import empty_rows
    from trainer.step import StepOptions, eval_step, train_step
    cfg = _cfg(0.2)
    cfg.optim.update(lr=1e-30, warmup_steps=0, schedule="constant", weight_decay=0.0)
    model = arch.build_model(cfg.model, nnx.Rngs(params=0, dropout=1))
    opt = nnx.Optimizer(model, optim.build_optimizer(cfg.optim, nnx.state(model, nnx.Param),
                                                     total_steps=10), wrt=nnx.Param)
    batch = {k: jnp.asarray(v) for k, v in empty_rows(2, 16).items()}
    batch.update(tokens=TOKENS, targets=TOKENS, loss_mask=jnp.ones((2, 16)),
                 segment_ids=jnp.ones((2, 16), jnp.int32),
                 positions=jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16)))
    opts = StepOptions.from_config(cfg)
    # lr 1e-30: updates vanish below f32 resolution, so different losses can only be different masks.
    losses = [float(train_step(model, opt, batch, opts=opts)["loss"]) for _ in range(3)]
    assert len(set(losses)) == 3
    ev = [float(eval_step(model, batch)["ce_sum"]) for _ in range(2)]
    assert ev[0] == ev[1]
    plain = arch.build_model(_cfg(0.0).model, nnx.Rngs(params=0, dropout=1))
    assert float(eval_step(plain, batch)["ce_sum"]) == pytest.approx(ev[0], rel=1e-6)


@pytest.mark.parametrize("field,value,match", [
    ("dropout", 1.0, "model.dropout=1.0"),
    ("dropout", -0.1, "model.dropout"),
    ("attention_dropout", 2.0, "model.attention_dropout=2.0"),
])
def test_bad_rates_name_the_field(field, value, match):
    cfg = _cfg(0.0)
    cfg.model[field] = value
    with pytest.raises(ValueError, match=match):
        arch.count_params(cfg.model)


@pytest.mark.parametrize("impl", ["cudnn", "xla"])
def test_attention_dropout_on_an_impl_without_it_is_refused(impl):
    cfg = _cfg(0.1, attention_impl=impl)
    with pytest.raises(ValueError, match=f"model.attention_impl='{impl}' has no attention dropout"):
        arch.count_params(cfg.model)
    cfg.model.attention_dropout = 0.0          # residual dropout alone needs no kernel support
    arch.count_params(cfg.model)


def test_mla_attention_dropout_reaches_the_kernel():
    from configs.deepseek_v3 import get_config as dsv3
    cfg = dsv3("tiny")
    cfg.model.update(dropout=0.0, attention_dropout=0.5, num_layers=1)
    cfg.model.moe.first_k_dense = 1
    model = arch.build_model(cfg.model, nnx.Rngs(params=0, dropout=1))
    clean = model(TOKENS)[0]
    assert not np.allclose(with_dropout(model, True)(TOKENS)[0], clean)
    np.testing.assert_array_equal(model(TOKENS)[0], clean)
