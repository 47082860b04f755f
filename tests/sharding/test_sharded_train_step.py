"""A jitted train step (loss + grads + an optax update) under every sharding preset equals
the single-device step (f32, 1e-5 relative), on 8 emulated CPU devices.

The MoE layer reaches expert parallelism through `sharding.expert`'s dispatch functions,
which engage inside `sharding.activate(mesh, rules)`.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sharding
from arch import build_model
from configs import deepseek_v3, llama3

MESHES = {  # preset -> mesh over 8 devices
    "dp": {"data": 8},
    "fsdp": {"fsdp": 8},
    "fsdp_tp": {"fsdp": 4, "tensor": 2},
    "fsdp_ep": {"fsdp": 4, "expert": 2},
    "fsdp_tp_ep": {"fsdp": 2, "tensor": 2, "expert": 2},
}


def small(family, dispatch="dropless"):
    c = (deepseek_v3 if family == "deepseek_v3" else llama3).get_config("tiny").model
    c.update(d_model=64, num_layers=1, mlp_dim=128, head_dim=16)
    if c.moe is not None:  # one MLA + MoE layer
        c.moe.update(expert_mlp_dim=32, first_k_dense=0, dispatch=dispatch,
                     capacity_factor=1.0 if dispatch == "capacity" else None)
        c.mla.update(q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    return c


def loss_fn(params, graphdef, rest, tokens):
    logits, aux = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
    logp = jax.nn.log_softmax(logits)
    ce = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
    return ce + aux["moe_aux_loss"] + aux["moe_z_loss"]


TX = optax.sgd(0.1, momentum=0.9)  # linear in the gradients: the tolerance carries over


def step(params, opt_state, graphdef, rest, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, graphdef, rest, tokens)
    updates, opt_state = TX.update(grads, opt_state, params)
    return loss, grads, optax.apply_updates(params, updates), opt_state


def run(cfg, preset):
    """(loss, grads, new params) of one step under `preset` (None: one device, no mesh),
    and the compiled HLO text. Parameters come from the same host-built model."""
    graphdef, params, rest = nnx.split(build_model(cfg, 0), nnx.Param, ...)
    tokens = jax.random.randint(jax.random.key(1), (8, 17), 0, cfg.vocab_size)
    opt_state = TX.init(params)
    fn = jax.jit(step, static_argnums=2)
    if preset is None:
        return fn(params, opt_state, graphdef, rest, tokens)[:3], None
    mesh, rules = sharding.make_mesh(MESHES[preset]), sharding.make_rules(preset)
    sharding.check_model_config(cfg, mesh, rules)
    p_sh = sharding.state_shardings(params, mesh, rules)
    params, rest = jax.device_put((params, rest), (p_sh, sharding.state_shardings(rest, mesh, rules)))
    opt_state = jax.device_put(opt_state, sharding.state_shardings(opt_state, mesh, rules))
    tokens = jax.device_put(tokens, sharding.batch_sharding(tokens.shape, mesh, rules))
    fn = jax.jit(step, static_argnums=2, out_shardings=(None, p_sh, p_sh, None))
    with sharding.activate(mesh, rules):
        compiled = fn.lower(params, opt_state, graphdef, rest, tokens).compile()
        out = fn(params, opt_state, graphdef, rest, tokens)
    # Gradients and new parameters keep the parameters' shardings.
    for g, s in zip(jax.tree.leaves(out[1]), jax.tree.leaves(p_sh), strict=True):
        assert g.sharding.is_equivalent_to(s, g.ndim)
    return out[:3], compiled.as_text()


def assert_same(got, ref):
    (loss, grads, new), (rloss, rgrads, rnew) = got, ref
    np.testing.assert_allclose(float(loss), float(rloss), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(rgrads), strict=True):   # per-array relative
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max() + 1e-12
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(rnew), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def weight_all_gathers(hlo: str, shapes) -> int:
    """all-gather ops whose result is the full shape of a parameter: FSDP's weight gathers."""
    want = {",".join(map(str, s)) for s in shapes}
    return sum(m in want for m in re.findall(r"= f32\[([\d,]+)\][^\n]*? all-gather\(", hlo))


def test_llama_fsdp_step_equals_single_device_and_gathers_weights():
    cfg = small("llama")
    got, hlo = run(cfg, "fsdp")
    assert_same(got, run(cfg, None)[0])
    shapes = [v.shape for v in jax.tree.leaves(nnx.state(build_model(cfg, 0), nnx.Param)) if v.ndim >= 2]
    assert weight_all_gathers(hlo, shapes) >= 4
    assert "reduce-scatter" in hlo or "all-reduce" in hlo   # gradients summed over fsdp


def test_deepseek_fsdp_tp_ep_step_equals_single_device_with_all_to_all():
    cfg = small("deepseek_v3")
    got, hlo = run(cfg, "fsdp_tp_ep")
    assert_same(got, run(cfg, None)[0])
    assert "all-to-all" in hlo


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(MESHES))
@pytest.mark.parametrize("family, dispatch", [("llama", None), ("deepseek_v3", "dropless"),
                                              ("deepseek_v3", "capacity")])
def test_every_preset_equals_single_device(family, dispatch, preset):
    cfg = small(family, dispatch or "dropless")
    got, hlo = run(cfg, preset)
    assert_same(got, run(cfg, None)[0])
    if "ep" in preset and family == "deepseek_v3":
        assert "all-to-all" in hlo
