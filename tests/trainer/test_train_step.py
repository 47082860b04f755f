"""The loss and the train step against plain formulas: z-loss, accumulation, MoE, QK-Clip."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import arch
from configs.base import moe_defaults
from configs.llama3 import get_config
from trainer.step import StepOptions, split_microbatches, token_loss_sums, train_step

Z = 1e-2


def np_loss(logits, targets, mask, z):
    """Masked mean cross-entropy + z * mean logsumexp^2, from the definitions (float64)."""
    x = np.asarray(logits, np.float64)
    m = x.max(-1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(-1)) + m[..., 0]                 # [B, T]
    logp = x - lse[..., None]
    nll = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
    w = np.asarray(mask, np.float64)
    return (w * nll).sum() / w.sum() + z * (w * lse ** 2).sum() / w.sum()


def small_model_config(**model):
    """One layer unless asked (compile time grows with unrolled layers)."""
    cfg = get_config("tiny")
    cfg.model.update(d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                     mlp_dim=64, max_seq_len=32, vocab_size=64)
    cfg.model.update(model)
    cfg.train.z_loss = Z
    return cfg


def random_batch(seed, b=8, t=16, vocab=64, ragged_mask=True):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (b, t)).astype(np.int32)
    mask = np.ones((b, t), np.float32)
    if ragged_mask:  # rows with different counted tokens: microbatches weigh differently
        for i in range(b):
            mask[i, t - 2 * i:] = 0.0
    return {"tokens": tokens, "targets": np.roll(tokens, -1, 1),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
            "segment_ids": np.ones((b, t), np.int32), "loss_mask": mask}


@nnx.jit
def run(model, batch):
    """The model on a batch, compiled once (eager op-by-op dispatch is slow on CPU)."""
    return model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])


def test_token_loss_sums_match_the_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, (2, 5))
    mask = (rng.random((2, 5)) > 0.3).astype(np.float32)
    s = token_loss_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    want = np_loss(logits, targets, mask, Z)
    got = (s["ce_sum"] + Z * s["z_sum"]) / s["tokens"]
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    np.testing.assert_allclose(float(s["tokens"]), mask.sum())


def test_z_loss_gradient_pulls_the_normaliser_to_zero():
    # d/dx z*lse^2 = 2 z lse softmax(x): check the formula's gradient numerically.
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 3, 7)), jnp.float32)

    @jax.jit
    def zterm(x):
        return token_loss_sums(x, jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 3)))["z_sum"]
    jax.test_util.check_grads(zterm, (x,), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
    g = jax.grad(zterm)(x)
    lse = jax.nn.logsumexp(x, -1, keepdims=True)
    chex.assert_trees_all_close(g, 2 * lse * jax.nn.softmax(x, -1), rtol=1e-5, atol=1e-6)


def test_microbatches_are_strided_rows():
    b = {"x": np.arange(8)[:, None] * np.ones((1, 3))}
    mb = split_microbatches(b, 4)["x"]
    assert mb.shape == (4, 2, 3)
    np.testing.assert_array_equal(mb[1, :, 0], [1, 5])


def _sgd_step(cfg, batch, accum):
    """(params - params after one SGD(lr=1) step, i.e. the gradient; the step's metrics)."""
    model = arch.build_model(cfg.model, nnx.Rngs(params=0))
    opt = nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param)
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    metrics = train_step(model, opt, jax.tree.map(jnp.asarray, batch),
                         opts=StepOptions(z_loss=Z, grad_accum=accum))
    assert int(opt.step[...]) == 1
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return jax.tree.map(lambda a, b: a - np.asarray(b), before, after), metrics


@pytest.mark.parametrize("accum", [1, 4])
def test_train_step_gradient_and_loss_match_the_plain_big_batch_loss(accum):
    """The gradient SGD applies is that of ce + z_loss over the whole batch, accumulated
    or not (rows with different numbers of counted tokens); the reported loss is its value."""
    cfg = small_model_config()
    batch = random_batch(0)
    model = arch.build_model(cfg.model, nnx.Rngs(params=0))
    graphdef, params = nnx.split(model, nnx.Param)

    def ref_loss(p):  # the whole batch, written from the definitions
        logits, _ = nnx.merge(graphdef, p)(batch["tokens"], positions=batch["positions"],
                                           segment_ids=batch["segment_ids"])
        lse = jnp.log(jnp.sum(jnp.exp(logits), -1))
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
        w = batch["loss_mask"]
        return (jnp.sum(w * nll) + Z * jnp.sum(w * lse ** 2)) / jnp.sum(w)

    ref_value, ref_grad = jax.jit(jax.value_and_grad(ref_loss))(params)
    ref_grad = nnx.to_pure_dict(ref_grad)
    logits, _ = run(model, jax.tree.map(jnp.asarray, batch))
    want_loss = np_loss(logits, batch["targets"], batch["loss_mask"], Z)
    np.testing.assert_allclose(float(ref_value), want_loss, rtol=1e-5)
    grad, metrics = _sgd_step(cfg, batch, accum)
    chex.assert_trees_all_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(metrics["loss"]), want_loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["ce"]) + float(metrics["z_loss"]), want_loss, rtol=1e-5)
    assert float(metrics["tokens"]) == batch["loss_mask"].sum()


def test_a_batch_without_segment_ids_trains_as_one_document_per_row():
    """No "segment_ids" (bench/train_mfu.py's batches) = all ones, checked against the
    reference-tied step above; the kernels then skip the segment mask."""
    cfg = small_model_config()
    batch = random_batch(0)
    grad, metrics = _sgd_step(cfg, batch, 1)
    grad_plain, metrics_plain = _sgd_step(cfg, {k: v for k, v in batch.items() if k != "segment_ids"}, 1)
    chex.assert_trees_all_close(grad_plain, grad, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(metrics_plain["loss"]), float(metrics["loss"]), rtol=1e-6)


def test_moe_aux_losses_enter_the_loss_and_bias_update_runs():
    moe = moe_defaults()
    moe.update(num_experts=4, top_k=2, expert_mlp_dim=16, aux_loss_coef=0.01, z_loss_coef=0.001,
               bias_update_rate=0.05, dispatch="dense")
    cfg = small_model_config(moe=moe, num_layers=2)
    batch = jax.tree.map(jnp.asarray, random_batch(3))
    model = arch.build_model(cfg.model, nnx.Rngs(params=0))
    logits, aux = run(model, batch)
    want = np_loss(logits, batch["targets"], batch["loss_mask"], Z)
    want += float(aux["moe_aux_loss"]) + float(aux["moe_z_loss"])
    loads = np.stack([np.asarray(a["expert_load"]) for a in aux["layers"]])      # [L, E]
    rate = moe.bias_update_rate
    want_bias = rate * np.sign(loads.mean(-1, keepdims=True) - loads)             # DeepSeek-V3

    opt = nnx.Optimizer(model, optax.sgd(0.0), wrt=nnx.Param)
    m = train_step(model, opt, batch, opts=StepOptions.from_config(cfg))
    np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-5)
    assert float(m["moe_aux_loss"]) > 0
    bias = np.stack([np.asarray(layer.mlp.router_bias[...]) for layer in model.stack.layers])
    np.testing.assert_allclose(bias, want_bias, atol=1e-7)


def test_scanned_moe_step_equals_the_layer_list():
    """scan_layers=True with router biases (non-Param state inside nnx.scan) trains like
    the layer list: same loss and the same bias update from the same parameters."""
    moe = moe_defaults()
    moe.update(num_experts=4, top_k=2, expert_mlp_dim=16, aux_loss_coef=0.01, bias_update_rate=0.05)
    cfg = small_model_config(moe=moe, num_layers=2)
    batch = jax.tree.map(jnp.asarray, random_batch(4))
    listed = arch.build_model(cfg.model, nnx.Rngs(params=0))
    cfg.model.scan_layers = True
    scanned = arch.build_model(cfg.model, nnx.Rngs(params=1))
    per_layer = [nnx.to_pure_dict(nnx.state(b)) for b in listed.stack.layers]
    state = nnx.state(scanned.stack.layers)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer))
    nnx.update(scanned.stack.layers, state)
    for name in ("embed", "final_norm", "lm_head"):  # copies: the step donates its inputs
        nnx.update(getattr(scanned, name), jax.tree.map(jnp.copy, nnx.state(getattr(listed, name))))
    losses, biases = [], []
    for model in (listed, scanned):
        opt = nnx.Optimizer(model, optax.sgd(0.0), wrt=nnx.Param)
        losses.append(float(train_step(model, opt, batch, opts=StepOptions.from_config(cfg))["loss"]))
    biases = [np.stack([np.asarray(b.mlp.router_bias[...]) for b in listed.stack.layers]),
              np.asarray(scanned.stack.layers.mlp.router_bias[...])]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    np.testing.assert_allclose(biases[1], biases[0], atol=1e-7)
    assert np.abs(biases[0]).max() > 0  # the update ran


def test_qk_clip_caps_each_heads_max_logit_at_tau():
    """With no parameter update, QK-Clip leaves each head's max logit at min(S_max, tau);
    with 2 microbatches S_max must be the max over both, i.e. over the whole batch."""
    cfg = small_model_config(track_max_logits=True)
    cfg.optim.qk_clip_tau = 0.045
    cfg.train.grad_accum = 2
    batch = jax.tree.map(jnp.asarray, random_batch(4, ragged_mask=False))
    model = arch.build_model(cfg.model, nnx.Rngs(params=0))

    def max_logits():
        return np.asarray(run(model, batch)[1]["max_logits"])   # [L, H]
    before = max_logits()
    assert (before > 0.045).any() and (before < 0.045).any()   # clipped and untouched heads
    opt = nnx.Optimizer(model, optax.sgd(0.0), wrt=nnx.Param)   # no update: clipping only
    m = train_step(model, opt, batch, opts=StepOptions.from_config(cfg))
    np.testing.assert_allclose(float(m["max_logit"]), before.max(), rtol=1e-5)
    np.testing.assert_allclose(max_logits(), np.minimum(before, 0.045), rtol=1e-4)


def test_bound_step_matches_train_step_and_updates_the_objects():
    """bind_train_step (nnx.cached_partial, what train.py runs) gives the losses, weights,
    optimizer state and dropout streams of plain train_step, step after step, and leaves
    them in the same model/optimizer objects that eval and checkpoints read."""
    import optim
    from trainer.step import bind_eval_step, bind_train_step, eval_step
    cfg = small_model_config(dropout=0.1)

    def build():
        model = arch.build_model(cfg.model, nnx.Rngs(params=0, dropout=1))
        tx = optim.build_optimizer(cfg.optim, nnx.state(model, nnx.Param), total_steps=100)
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    (m1, o1), (m2, o2) = build(), build()
    opts = StepOptions.from_config(cfg)
    step = bind_train_step(m2, o2)
    for seed in range(3):
        batch = jax.tree.map(jnp.asarray, random_batch(seed))
        want = train_step(m1, o1, batch, opts=opts)
        got = step(batch, opts=opts)
        np.testing.assert_array_equal(np.asarray(got["loss"]), np.asarray(want["loss"]))
    as_numbers = lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
    chex.assert_trees_all_equal(jax.tree.map(as_numbers, nnx.state((m2, o2))),
                                jax.tree.map(as_numbers, nnx.state((m1, o1))))
    assert int(o2.step.value) == 3
    np.testing.assert_array_equal(np.asarray(bind_eval_step(m2)(batch)["ce_sum"]),
                                  np.asarray(eval_step(m1, batch)["ce_sum"]))
