"""sharding/expert.py: expert parallelism (all_to_all in shard_map) against plain references.

References: `moe_dense_reference` (every expert on every token, masked: the formula) and
a brute-force loop of GShard/Switch capacity priority (slot-major, then token order).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sharding
from arch.moe import moe_dense_reference
from arch.moe_dispatch import ExpertWeights, expert_capacity
from sharding import expert as ep
from sharding.mesh import make_mesh

E, D, F, N, K = 8, 16, 12, 64, 2
ACT = jax.nn.silu


def problem(seed=0, gated=True):
    ks = jax.random.split(jax.random.key(seed), 6)
    w = ExpertWeights(jax.random.normal(ks[0], (E, D, F)) / 4 if gated else None,
                      jax.random.normal(ks[1], (E, D, F)) / 4, jax.random.normal(ks[2], (E, F, D)) / 4)
    x = jax.random.normal(ks[3], (N, D))
    logits = jax.random.normal(ks[4], (N, E)) + jnp.linspace(0.0, 3.0, E)  # skewed: some experts overflow
    weights, experts = jax.lax.top_k(jax.nn.softmax(logits), K)           # distinct experts per token
    valid = jax.random.uniform(ks[5], (N,)) > 0.2
    return x, experts.astype(jnp.int32), weights, valid, w


def brute_force_keep(experts, valid, capacity):
    """keep[n, k]: for k = 0..K-1, for n = 0..N-1, an expert takes tokens until it is full."""
    experts, valid = np.asarray(experts), np.asarray(valid)
    n, k = experts.shape
    keep, used = np.zeros((n, k), bool), np.zeros(E, int)
    for j in range(k):
        for i in range(n):
            e = experts[i, j]
            if valid[i] and used[e] < capacity:
                keep[i, j], used[e] = True, used[e] + 1
    return keep


def rel_close(a, b, rtol=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(b).max(), 1e-30)
    np.testing.assert_array_less(np.abs(a - b).max() / scale, rtol)


MESHES = [{"data": 2, "expert": 4}, {"fsdp": 2, "tensor": 2, "expert": 2}]


@pytest.mark.parametrize("mesh_cfg", MESHES, ids=lambda c: "_".join(f"{k}{v}" for k, v in c.items()))
def test_dropless_and_capacity_match_references(mesh_cfg):
    x, experts, weights, valid, w = problem()
    cap = expert_capacity(N, K, E, 1.0)
    keep_ref = brute_force_keep(experts, valid, cap)
    assert 0 < (~keep_ref).sum() and keep_ref.any()                      # the case drops some
    mesh = make_mesh(mesh_cfg)
    with sharding.activate(mesh):
        y = jax.jit(lambda *a: ep.dropless_moe(*a, ACT))(x, experts, weights, w)
        yc, keep = jax.jit(lambda *a: ep.capacity_moe(*a, ACT, capacity=cap, valid=valid))(
            x, experts, weights, w)
    # Dropless drops none: the full formula over every assignment.
    rel_close(y, moe_dense_reference(x, experts, weights, w, ACT))
    # Capacity drops exactly the brute-force (= single-device) assignments.
    np.testing.assert_array_equal(np.asarray(keep), keep_ref)
    rel_close(yc, moe_dense_reference(x, experts, weights * keep_ref, w, ACT))


def test_capacity_shard_scope_is_per_group_capacity():
    """scope="shard": each token shard (GShard group) has capacity ceil(C / S)."""
    x, experts, weights, valid, w = problem(seed=1, gated=False)
    mesh = make_mesh({"data": 2, "expert": 4})                           # 8 token shards of 8
    cap = expert_capacity(N, K, E, 2.0)
    with sharding.activate(mesh), ep.capacity_scope("shard"):
        yc, keep = jax.jit(lambda *a: ep.capacity_moe(*a, jax.nn.gelu, capacity=cap, valid=valid))(
            x, experts, weights, w)
    s, n = 8, N // 8
    keep_ref = np.concatenate([brute_force_keep(experts[i * n:(i + 1) * n], valid[i * n:(i + 1) * n],
                                                math.ceil(cap / s)) for i in range(s)])
    np.testing.assert_array_equal(np.asarray(keep), keep_ref)
    rel_close(yc, moe_dense_reference(x, experts, weights * keep_ref, w, jax.nn.gelu))


def test_gradients_and_hlo_all_to_all():
    x, experts, weights, _, w = problem(seed=2)
    mesh = make_mesh({"fsdp": 4, "expert": 2})

    def loss(fn, x, weights, w):
        return jnp.sum(fn(x, experts, weights, w, ACT) ** 2)

    ref = jax.grad(lambda *a: loss(moe_dense_reference, *a), argnums=(0, 1, 2))(x, weights, w)
    with sharding.activate(mesh):
        f = jax.jit(jax.grad(lambda *a: loss(ep.dropless_moe, *a), argnums=(0, 1, 2)))
        compiled = f.lower(x, weights, w).compile()
        got = f(x, weights, w)
    assert "all-to-all" in compiled.as_text()
    jax.tree.map(rel_close, got, ref)


def test_falls_back_to_single_device_without_expert_mesh():
    x, experts, weights, _, w = problem()
    y = ep.dropless_moe(x, experts, weights, w, ACT)                     # no mesh active
    rel_close(y, moe_dense_reference(x, experts, weights, w, ACT))


def test_bad_splits_raise():
    x, experts, weights, _, w = problem()
    w6 = ExpertWeights(*(a[:6] for a in w))
    with pytest.raises(ValueError, match=r"moe.num_experts=6 must be divisible by mesh.expert=4"):
        ep.ep_dropless_moe(x, experts % 6, weights, w6, ACT, mesh=make_mesh({"data": 2, "expert": 4}))
    with pytest.raises(ValueError, match=r"tokens \(batch\*seq=60\) must be divisible"):
        ep.ep_dropless_moe(x[:60], experts[:60], weights[:60], w, ACT, mesh=make_mesh({"expert": 8}))
    with pytest.raises(ValueError, match=r"capacity_scope='local' must be one of"):
        with ep.capacity_scope("local"):
            pass
