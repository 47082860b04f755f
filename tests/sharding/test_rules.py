"""sharding/rules.py and state.py: logical -> mesh specs, config checks, params born sharded."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sharding
from configs import deepseek_v3, llama3
from sharding.mesh import make_mesh
from sharding.rules import (
    check_model_config,
    constrain,
    logical_to_spec,
    make_rules,
    rules_for_mesh,
)


def spec(axes, shape, mesh_cfg, preset, kind="params"):
    return logical_to_spec(axes, shape, make_mesh(mesh_cfg), make_rules(preset), kind=kind)


@pytest.mark.parametrize("preset, mesh_cfg, axes, shape, want", [
    # dp: every parameter replicated.
    ("dp", {"data": 8}, ("embed", "mlp"), (64, 128), P(None, None)),
    # fsdp: the embed dim over fsdp, wherever it is.
    ("fsdp", {"fsdp": 8}, ("mlp", "embed"), (128, 64), P(None, "fsdp")),
    # fsdp fallback (ZeRO-3): no embed dim -> the largest divisible dim, never `layers`.
    ("fsdp", {"fsdp": 8}, ("layers", "latent", "heads", "head_dim"), (16, 32, 4, 24),
     P(None, "fsdp", None, None)),
    ("fsdp", {"fsdp": 8}, ("heads",), (4,), P(None)),                 # 4 % 8: stays replicated
    # Megatron: column- and row-parallel.
    ("fsdp_tp", {"fsdp": 4, "tensor": 2}, ("embed", "heads", "head_dim"), (64, 4, 16),
     P("fsdp", "tensor", None)),
    ("fsdp_tp", {"fsdp": 4, "tensor": 2}, ("heads", "head_dim", "embed"), (4, 16, 64),
     P("tensor", None, "fsdp")),
    ("fsdp_tp", {"fsdp": 4, "tensor": 2}, ("vocab", "embed"), (256, 64), P("tensor", "fsdp")),
    # kv_heads that the tensor axis does not divide: replicated (not an error).
    ("fsdp_tp", {"fsdp": 1, "tensor": 8}, ("embed", "kv_heads", "head_dim"), (64, 2, 16),
     P(None, None, None)),
    # Expert parallelism on the stacked expert weights.
    ("fsdp_tp_ep", {"fsdp": 2, "tensor": 2, "expert": 2}, ("expert", "embed", "mlp"), (8, 64, 32),
     P("expert", "fsdp", "tensor")),
    # Mesh axes of size 1 are skipped.
    ("fsdp_tp", {"fsdp": 8, "tensor": 1}, ("embed", "mlp"), (64, 128), P("fsdp", None)),
    # Activations: batch over every batch-splitting axis, embed never split.
    ("fsdp_ep", {"data": 2, "fsdp": 2, "expert": 2}, ("batch", "seq", "embed"), (8, 16, 64),
     P(("data", "fsdp", "expert"), None, None)),
    ("fsdp+sequence", {"fsdp": 2, "sequence": 4}, ("batch", "seq", "embed"), (8, 16, 64),
     P("fsdp", "sequence", None)),
    # A batch that only part of the axes divide keeps the longest dividing prefix.
    ("fsdp_ep", {"data": 2, "fsdp": 2, "expert": 2}, ("batch", "seq"), (4, 16), P(("data", "fsdp"), None)),
])
def test_logical_to_spec(preset, mesh_cfg, axes, shape, want):
    kind = "activations" if "batch" in axes else "params"
    assert spec(axes, shape, {**mesh_cfg}, preset, kind) == want


def test_rules_for_mesh_follows_the_mesh():
    assert rules_for_mesh(make_mesh({"data": 8})).name == "dp"
    assert rules_for_mesh(make_mesh({"fsdp": 4, "tensor": 2})).name == "dp+fsdp+tp"
    assert rules_for_mesh(make_mesh({"fsdp": 2, "expert": 2, "sequence": 2})).name == "dp+fsdp+ep+sequence"


def small(mod):
    c = mod.get_config("tiny").model
    c.update(d_model=64, num_layers=1, mlp_dim=128, head_dim=16)
    if c.moe is not None:
        c.moe.update(expert_mlp_dim=32, first_k_dense=0)
    return c


@pytest.mark.parametrize("mesh_cfg, preset, field, match", [
    ({"fsdp": 1, "tensor": 8}, "fsdp_tp", "llama", r"model.num_heads=4 must be divisible by mesh.tensor=8"),
    ({"fsdp": 2, "expert": 4}, "fsdp_ep", "moe6", r"model.moe.num_experts=6 must be divisible by mesh.expert=4"),
    ({"fsdp": 4, "tensor": 2}, "fsdp", "llama", r"mesh.tensor=2 but sharding preset 'fsdp'"),
])
def test_bad_config_for_mesh_raises_before_compile(mesh_cfg, preset, field, match):
    cfg = small(deepseek_v3 if field == "moe6" else llama3)
    if field == "moe6":
        cfg.moe.update(num_experts=6, n_group=1, topk_group=1)
    mesh, rules = make_mesh(mesh_cfg), make_rules(preset)
    with pytest.raises(ValueError, match=match):
        check_model_config(cfg, mesh, rules)
    with pytest.raises(ValueError, match=match):   # creation checks first, builds nothing
        sharding.create_sharded_model(cfg, mesh, rules)


def test_required_split_raises_per_array():
    with pytest.raises(ValueError, match=r"q/kernel: its 'heads' dim of size 4 must be divisible by mesh.tensor=8"):
        logical_to_spec(("embed", "heads", "head_dim"), (64, 4, 16), make_mesh({"tensor": 8}),
                        make_rules("tp"), where="q/kernel")


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match=r"unknown parts \['zero'\]"):
        make_rules("fsdp_zero")


def test_constrain_is_a_noop_without_mesh_and_shards_under_one():
    x = jnp.arange(8 * 4 * 6, dtype=jnp.float32).reshape(8, 4, 6)
    assert constrain(x, ("batch", "seq", "embed")) is x
    mesh, rules = make_mesh({"data": 2, "fsdp": 4}), make_rules("fsdp")
    with sharding.activate(mesh, rules):
        y = jax.jit(lambda a: constrain(a * 2, ("batch", "seq", "embed")))(x)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None, None)), 3)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x) * 2)


def test_fsdp8_params_born_sharded_and_per_device_bytes():
    """Under fsdp=8 each device holds <= 1/8 of the parameters plus replicated small tensors,
    read from the arrays' own shardings; values equal the host-built model's."""
    cfg = small(deepseek_v3)
    mesh = make_mesh({"fsdp": 8})
    model = sharding.create_sharded_model(cfg, mesh, make_rules("fsdp"), seed=0)
    arrays = [v[...] for _, v in nnx.to_flat_state(nnx.state(model))]
    total = sum(a.nbytes for a in arrays)
    replicated = [a for a in arrays if a.sharding.is_fully_replicated]
    assert all(a.nbytes <= 1024 for a in replicated), [a.shape for a in replicated]
    rep_bytes = sum(a.nbytes for a in replicated)
    per_device = max(sum(s.data.nbytes for a in arrays for s in a.addressable_shards if s.device == d)
                     for d in mesh.devices.flat)
    assert per_device <= total / 8 + rep_bytes
    assert per_device == sharding.bytes_per_device(arrays)
    assert rep_bytes < 0.01 * total
    host = nnx.state(__import__("arch").build_model(cfg, 0))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8),
                 nnx.state(model), host)


def test_shard_batch_and_bad_batch_size():
    mesh, rules = make_mesh({"data": 2, "fsdp": 2, "expert": 2}), make_rules("fsdp_ep")
    b = sharding.shard_batch({"tokens": np.arange(8 * 16).reshape(8, 16)}, mesh, rules)
    assert b["tokens"].sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp", "expert"))), 2)
    assert math.prod(b["tokens"].addressable_shards[0].data.shape) == 16
    with pytest.raises(ValueError, match=r"batch size 6 must be divisible by mesh.data=2 x mesh.fsdp=2"):
        sharding.shard_batch({"tokens": np.zeros((6, 16))}, mesh, rules)
