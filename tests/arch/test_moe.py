"""MoE layer against independent references: numpy loops over tokens written from the
papers' formulas (GShard/Switch capacity and aux loss, ST-MoE z-loss, DeepSeek-V3
group-limited routing and aux-loss-free balancing) and the dense jnp reference."""
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from arch import moe as moe_lib
from arch.moe import MoE, moe_dense_reference, route, update_router_biases
from arch.moe_dispatch import (
    ExpertWeights,
    capacity_moe,
    dropless_moe,
    expert_capacity,
    permute_rows,
)
from configs.base import model_defaults, moe_defaults


# ----------------------------------------------------------------------------- numpy refs
def np_silu(x):
    return x / (1.0 + np.exp(-x))


def np_gelu(x):  # exact (erf) GELU
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def np_route(logits, *, top_k, score_func="softmax", norm=True, scale=1.0, n_group=1,
             topk_group=1, bias=None):
    """DeepSeek-V3 gate, one token at a time, in float64."""
    n, e = logits.shape
    bias = np.zeros(e) if bias is None else np.asarray(bias, np.float64)
    experts, weights = np.zeros((n, top_k), np.int64), np.zeros((n, top_k))
    for t in range(n):
        lg = logits[t].astype(np.float64)
        if score_func == "softmax":
            s = np.exp(lg - lg.max())
            s = s / s.sum()
        else:
            s = 1.0 / (1.0 + np.exp(-lg))
        sel = s + bias
        allowed = np.ones(e, bool)
        if n_group > 1:
            size = e // n_group
            gscore = []
            for g in range(n_group):
                part = np.sort(sel[g * size:(g + 1) * size])[::-1]
                # DeepSeek-V3: sum of the top-2 in the group; DeepSeek-V2 (softmax): max.
                gscore.append(part[:2].sum() if score_func == "sigmoid" else part[0])
            kept = np.argsort(-np.array(gscore), kind="stable")[:topk_group]
            allowed[:] = False
            for g in kept:
                allowed[g * size:(g + 1) * size] = True
        cand = np.where(allowed, sel, -np.inf)
        idx = np.argsort(-cand, kind="stable")[:top_k]
        w = s[idx]
        if norm:
            w = w / w.sum()
        experts[t], weights[t] = idx, w * scale
    return experts, weights


def np_ffn(x, e, w_gate, w_up, w_down, act=np_silu):
    h = x @ w_up[e]
    h = act(x @ w_gate[e]) * h if w_gate is not None else act(h)
    return h @ w_down[e]


def np_moe(x, experts, weights, w_gate, w_up, w_down, keep=None, act=np_silu):
    """Brute force: y[t] = sum_k keep[t,k] * weights[t,k] * FFN_{experts[t,k]}(x[t])."""
    y = np.zeros_like(x, dtype=np.float64)
    for t in range(x.shape[0]):
        for k in range(experts.shape[1]):
            if keep is None or keep[t, k]:
                y[t] += weights[t, k] * np_ffn(x[t], experts[t, k], w_gate, w_up, w_down, act)
    return y


def np_capacity_keep(experts, num_experts, capacity, valid=None):
    """GShard/Switch priority: slot-major (all first choices first), then token order."""
    n, k = experts.shape
    valid = np.ones(n, bool) if valid is None else valid
    count, keep = np.zeros(num_experts, int), np.zeros((n, k), bool)
    for slot in range(k):
        for t in range(n):
            e = experts[t, slot]
            if valid[t] and count[e] < capacity:
                keep[t, slot] = True
                count[e] += 1
    return keep


def np_aux_loss(scores, experts, mask, top_k, coef):
    """alpha * E * sum_i f_i P_i with f_i = share of assignments, P_i = mean normalised score."""
    s, m = np.asarray(scores, np.float64), np.asarray(mask, bool)
    e = s.shape[1]
    counts = np.zeros(e)
    for t in np.nonzero(m)[0]:
        for i in experts[t]:
            counts[i] += 1
    f = counts / (top_k * m.sum())
    p = (s[m] / s[m].sum(-1, keepdims=True)).mean(0)
    return coef * e * np.sum(f * p)


# ----------------------------------------------------------------------------- helpers
def make_cfg(**moe_overrides):
    cfg = model_defaults()
    cfg.d_model = 16
    cfg.moe = moe_defaults()
    cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.expert_mlp_dim = 8, 2, 12
    for k, v in moe_overrides.items():
        cfg.moe[k] = v
    return cfg


def make_moe(seed=0, *, init_std=0.3, activation="swiglu", **moe_overrides):
    cfg = make_cfg(**moe_overrides)
    cfg.init_std, cfg.activation = init_std, activation
    return MoE(cfg, rngs=nnx.Rngs(seed))


@nnx.jit
def apply(moe, x, segment_ids=None):
    return moe(x, segment_ids=segment_ids)


def np_weights(moe):
    g = None if moe.w_gate is None else np.asarray(moe.w_gate[...], np.float64)
    return g, np.asarray(moe.w_up[...], np.float64), np.asarray(moe.w_down[...], np.float64)


def rand_weights(key, e, d, f, gated=True, std=0.3):
    k1, k2, k3 = jax.random.split(key, 3)
    return ExpertWeights(std * jax.random.normal(k1, (e, d, f)) if gated else None,
                         std * jax.random.normal(k2, (e, d, f)),
                         std * jax.random.normal(k3, (e, f, d)))


def rand_assignments(rng, n, e, k, skew=None):
    """Distinct experts per token (Gumbel top-k, optionally skewed) and positive weights."""
    logp = np.zeros(e) if skew is None else np.log(skew)
    experts = np.argsort(-(rng.gumbel(size=(n, e)) + logp), axis=1)[:, :k]
    return experts.astype(np.int32), rng.uniform(0.1, 1.0, (n, k)).astype(np.float32)


# ----------------------------------------------------------------------------- routing
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("norm", [True, False])
def test_route_topk_matches_numpy(score_func, norm):
    logits = np.asarray(jax.random.normal(jax.random.key(1), (13, 8)) * 2)
    r = route(jnp.asarray(logits), top_k=3, score_func=score_func, norm_topk_prob=norm,
              routed_scaling_factor=2.5)
    e_np, w_np = np_route(logits, top_k=3, score_func=score_func, norm=norm, scale=2.5)
    np.testing.assert_array_equal(np.asarray(r.experts), e_np)
    chex.assert_trees_all_close(np.asarray(r.weights), w_np, rtol=1e-5, atol=1e-6)
    chex.assert_shape(r.scores, (13, 8))


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_group_limited_routing_matches_deepseek_v3_rule(score_func):
    # 16 experts in 4 groups of 4, keep 2 groups, top-4 (DeepSeek-V3 shape: 256/8/4/8).
    logits = np.asarray(jax.random.normal(jax.random.key(2), (40, 16)) * 2)
    bias = np.asarray(jax.random.normal(jax.random.key(3), (16,)) * 0.3)
    kw = dict(top_k=4, n_group=4, topk_group=2)
    r = route(jnp.asarray(logits), score_func=score_func, bias=jnp.asarray(bias), **kw)
    e_np, w_np = np_route(logits, score_func=score_func, bias=bias, **kw)
    np.testing.assert_array_equal(np.asarray(r.experts), e_np)
    chex.assert_trees_all_close(np.asarray(r.weights), w_np, rtol=1e-5, atol=1e-6)
    # Every chosen expert lies in at most topk_group groups ...
    assert max(len(set(row // 4)) for row in np.asarray(r.experts)) <= 2
    # ... and the restriction matters: plain top-k picks differently for some tokens.
    e_plain, _ = np_route(logits, score_func=score_func, bias=bias, top_k=4)
    assert (np.sort(e_plain, 1) != np.sort(e_np, 1)).any()


def test_bias_changes_selection_not_weights():
    logits = np.asarray(jax.random.normal(jax.random.key(4), (20, 8)))
    bias = np.zeros(8)
    bias[5] = 10.0  # expert 5 always selected
    r = route(jnp.asarray(logits), top_k=2, score_func="sigmoid", norm_topk_prob=False,
              bias=jnp.asarray(bias))
    assert (np.asarray(r.experts)[:, 0] == 5).all()
    # weight = the unbiased sigmoid score of expert 5, not score + 10.
    chex.assert_trees_all_close(np.asarray(r.weights[:, 0]), 1 / (1 + np.exp(-logits[:, 5])),
                                rtol=1e-5)


# ----------------------------------------------------------------------------- dropless
@pytest.mark.parametrize("gated", [True, False])
def test_dropless_equals_dense_reference_and_bruteforce(gated):
    n, d, f, e, k = 11, 6, 10, 5, 2
    act, np_act = (jax.nn.silu, np_silu) if gated else (lambda v: jax.nn.gelu(v, approximate=False), np_gelu)
    w = rand_weights(jax.random.key(0), e, d, f, gated)
    x = jax.random.normal(jax.random.key(1), (n, d))
    experts, weights = rand_assignments(np.random.default_rng(0), n, e, k, skew=[5, 1, 1, 1, 0.2])
    y = jax.jit(dropless_moe, static_argnums=4)(x, experts, weights, w, act)
    y_ref = jax.jit(moe_dense_reference, static_argnums=4)(x, experts, weights, w, act)
    y_np = np_moe(np.asarray(x, np.float64), experts, weights,
                  *(None if a is None else np.asarray(a, np.float64) for a in w), act=np_act)
    chex.assert_trees_all_close(y, y_ref, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(np.asarray(y), y_np, rtol=1e-5, atol=1e-6)


def test_dropless_grads_equal_dense_reference():
    n, d, f, e, k = 9, 6, 8, 4, 2
    w = rand_weights(jax.random.key(5), e, d, f)
    x = jax.random.normal(jax.random.key(6), (n, d))
    experts, weights = rand_assignments(np.random.default_rng(1), n, e, k)
    ct = jax.random.normal(jax.random.key(7), (n, d))

    def loss(fn):
        return lambda x, w, g: jnp.sum(fn(x, experts, g, w, jax.nn.silu) * ct)

    g_fast = jax.jit(jax.grad(loss(dropless_moe), argnums=(0, 1, 2)))(x, w, jnp.asarray(weights))
    g_ref = jax.jit(jax.grad(loss(moe_dense_reference), argnums=(0, 1, 2)))(x, w, jnp.asarray(weights))
    chex.assert_trees_all_close(g_fast, g_ref, rtol=1e-5, atol=1e-5)
    # The reference's own gradients against finite differences.
    check_grads(lambda x, wu, wd: moe_dense_reference(x, experts, weights, w._replace(w_up=wu, w_down=wd), jax.nn.silu),
                (x, w.w_up, w.w_down), order=1, modes=("rev",), atol=2e-2, rtol=2e-2)


def test_permute_rows_and_the_dropless_gradient_gather_without_scatter():
    """permute_rows: x[perm] with the inverse gather as its gradient, equal to autodiff of
    x[perm]; the dropless layer's gradient then holds no scatter into the [N*K, D] rows
    (an atomic scatter-add on a GPU)."""
    x = jax.random.normal(jax.random.key(10), (7, 3))
    perm = jnp.asarray(np.random.default_rng(3).permutation(7))
    ct = jax.random.normal(jax.random.key(11), (7, 3))
    got = jax.vjp(lambda x: permute_rows(x, perm, jnp.argsort(perm)), x)
    want = jax.vjp(lambda x: x[perm], x)
    chex.assert_trees_all_close(got[0], want[0])
    chex.assert_trees_all_close(got[1](ct), want[1](ct))

    n, d, f, e, k = 9, 6, 8, 4, 2
    w = rand_weights(jax.random.key(5), e, d, f)
    experts, weights = rand_assignments(np.random.default_rng(1), n, e, k)
    grad = jax.grad(lambda x: jnp.sum(dropless_moe(x, experts, weights, w, jax.nn.silu)))
    jaxpr = jax.make_jaxpr(grad)(jax.random.normal(jax.random.key(6), (n, d)))
    row_scatters = [q for q in jaxpr.jaxpr.eqns if "scatter" in q.primitive.name
                    and q.outvars[0].aval.shape == (n * k, d)]
    assert not row_scatters, row_scatters


def test_dropless_bf16_close_to_f32_reference():
    n, d, f, e, k = 17, 16, 24, 6, 3
    w = rand_weights(jax.random.key(8), e, d, f, std=0.25)
    x = jax.random.normal(jax.random.key(9), (n, d))
    experts, weights = rand_assignments(np.random.default_rng(2), n, e, k)
    y16 = jax.jit(dropless_moe, static_argnums=4)(x.astype(jnp.bfloat16), experts, weights, w, jax.nn.silu)
    assert y16.dtype == jnp.bfloat16
    y_ref = jax.jit(moe_dense_reference, static_argnums=4)(x, experts, weights, w, jax.nn.silu)
    scale = float(jnp.abs(y_ref).max())
    chex.assert_trees_all_close(y16.astype(jnp.float32), y_ref, atol=3e-2 * scale, rtol=0)


@pytest.mark.parametrize("gmm_impl", ["auto", "pallas_gpu"])
def test_module_dropless_equals_dense_values_and_grads(gmm_impl):
    """Same params, two dispatch paths: outputs and gradients wrt x and all params.

    gmm_impl="pallas_gpu" runs the Triton grouped-matmul kernels (forward, and the
    backward's transposed gmm and tgmm) in interpret mode, picked by the kernel on CPU.
    """
    fast = make_moe(0, dispatch="dropless", gmm_impl=gmm_impl)
    ref = make_moe(0, dispatch="dense")
    x = jax.random.normal(jax.random.key(10), (2, 7, 16))
    seg = jnp.array([[1, 1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1]])

    def loss(m, x):
        y, aux = m(x, segment_ids=seg)
        return jnp.sum(jnp.sin(y)), y

    grad_fn = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, y1), g1 = grad_fn(fast, x)
    (_, y2), g2 = grad_fn(ref, x)
    chex.assert_trees_all_close(y1, y2, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(g1, g2, rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(g1[0].router.kernel[...]).max()) > 0  # router learns through weights


def test_module_bf16_compute_close_to_f32_dense():
    """bf16 compute, f32 params and router: same routing, output within bf16 error."""
    cfg16 = make_cfg(dispatch="dropless")
    cfg16.init_std, cfg16.dtype = 0.3, "bfloat16"
    fast16, ref = MoE(cfg16, rngs=nnx.Rngs(9)), make_moe(9, dispatch="dense")
    x = jax.random.normal(jax.random.key(20), (2, 9, 16))
    (y16, a16), (y32, a32) = apply(fast16, x), apply(ref, x)
    assert y16.dtype == jnp.float32  # output in the input's dtype
    np.testing.assert_array_equal(np.asarray(a16["expert_load"]), np.asarray(a32["expert_load"]))
    scale = float(jnp.abs(y32).max())
    chex.assert_trees_all_close(y16, y32, atol=3e-2 * scale, rtol=0)


def test_module_matches_numpy_bruteforce_sigmoid_scaled_grouped():
    moe = make_moe(1, score_func="sigmoid", routed_scaling_factor=2.5, n_group=4, topk_group=2,
                   norm_topk_prob=True)
    x = jax.random.normal(jax.random.key(11), (3, 5, 16))
    y, _ = apply(moe, x)
    xn = np.asarray(x, np.float64).reshape(15, 16)
    e_np, w_np = np_route(xn @ np.asarray(moe.router.kernel[...], np.float64), top_k=2,
                          score_func="sigmoid", scale=2.5, n_group=4, topk_group=2)
    y_np = np_moe(xn, e_np, w_np, *np_weights(moe)).reshape(3, 5, 16)
    chex.assert_trees_all_close(np.asarray(y), y_np, rtol=1e-4, atol=1e-5)


def test_shared_experts_added():
    moe = make_moe(2, num_shared_experts=2, shared_mlp_dim=5)
    assert moe.shared.up.kernel.shape == (16, 10)  # 2 shared experts of width 5, fused
    x = jax.random.normal(jax.random.key(12), (2, 4, 16))
    y, _ = apply(moe, x)
    xn = np.asarray(x, np.float64).reshape(8, 16)
    e_np, w_np = np_route(xn @ np.asarray(moe.router.kernel[...], np.float64), top_k=2)
    routed = np_moe(xn, e_np, w_np, *np_weights(moe))
    s = moe.shared
    wg, wu, wd = (np.asarray(v[...], np.float64) for v in (s.gate.kernel, s.up.kernel, s.down.kernel))
    shared = (np_silu(xn @ wg) * (xn @ wu)) @ wd
    assert np.abs(shared).max() > 1e-3
    chex.assert_trees_all_close(np.asarray(y).reshape(8, 16), routed + shared, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- capacity
def test_expert_capacity_formula():
    assert expert_capacity(24, 2, 4, 0.5) == 6      # ceil(0.5 * 24 * 2 / 4)
    assert expert_capacity(10, 2, 8, 1.25) == 4     # ceil(3.125)
    assert expert_capacity(10, 2, 2, 4.0) == 10     # clipped at N tokens


@pytest.mark.parametrize("use_padding", [False, True])
def test_capacity_drops_exactly_the_numpy_reference(use_padding):
    n, d, f, e, k = 24, 6, 8, 4, 2
    rng = np.random.default_rng(3)
    experts, weights = rand_assignments(rng, n, e, k, skew=[6, 2, 1, 1])
    valid = rng.random(n) > 0.25 if use_padding else None
    cap = math.ceil(0.5 * n * k / e)
    w = rand_weights(jax.random.key(13), e, d, f)
    x = jax.random.normal(jax.random.key(14), (n, d))
    fn = jax.jit(functools.partial(capacity_moe, act=jax.nn.silu, capacity=cap))
    y, keep = fn(x, experts, weights, w, valid=None if valid is None else jnp.asarray(valid))
    keep_np = np_capacity_keep(experts, e, cap, valid)
    assert 0 < (~keep_np).sum() < n * k - 4  # some dropped, some kept: the test can fail
    np.testing.assert_array_equal(np.asarray(keep), keep_np)
    y_np = np_moe(np.asarray(x, np.float64), experts, weights,
                  *(np.asarray(a, np.float64) for a in w), keep=keep_np)
    chex.assert_trees_all_close(np.asarray(y), y_np, rtol=1e-5, atol=1e-6)


def test_capacity_module_dropped_fraction_and_jit():
    moe = make_moe(3, dispatch="capacity", capacity_factor=0.5)
    x = jax.random.normal(jax.random.key(15), (2, 9, 16)) + 0.5  # shifted: skewed routing
    seg = jnp.array([[1] * 9, [1] * 6 + [0] * 3])
    y, aux = nnx.jit(lambda m, x: m(x, segment_ids=seg))(moe, x)
    xn = np.asarray(x, np.float64).reshape(18, 16)
    valid = np.asarray(seg).reshape(-1) != 0
    e_np, w_np = np_route(xn @ np.asarray(moe.router.kernel[...], np.float64), top_k=2)
    keep = np_capacity_keep(e_np, 8, math.ceil(0.5 * 18 * 2 / 8), valid)
    y_np = np_moe(xn, e_np, w_np, *np_weights(moe), keep=keep)
    chex.assert_trees_all_close(np.asarray(y).reshape(18, 16)[valid], y_np[valid], rtol=1e-4, atol=1e-5)
    dropped = 1 - keep[valid].sum() / (valid.sum() * 2)
    assert dropped > 0
    np.testing.assert_allclose(float(aux["dropped_fraction"]), dropped, rtol=1e-6)


def test_capacity_equals_dense_when_capacity_is_large():
    cap_moe = make_moe(4, dispatch="capacity", capacity_factor=float(8 / 2))  # C = N
    dense = make_moe(4, dispatch="dense")
    x = jax.random.normal(jax.random.key(16), (2, 6, 16))
    (y1, a1), (y2, _) = apply(cap_moe, x), apply(dense, x)
    chex.assert_trees_all_close(y1, y2, rtol=1e-5, atol=1e-6)
    assert float(a1["dropped_fraction"]) == 0.0


# ----------------------------------------------------------------------------- losses
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_aux_loss_z_loss_and_load_by_hand(score_func):
    moe = make_moe(5, score_func=score_func, aux_loss_coef=0.01, z_loss_coef=1e-3)
    x = jax.random.normal(jax.random.key(17), (2, 8, 16))
    seg = jnp.array([[1] * 5 + [0] * 3, [1] * 3 + [2] * 5])
    _, aux = apply(moe, x, seg)
    xn = np.asarray(x, np.float64).reshape(16, 16)
    logits = xn @ np.asarray(moe.router.kernel[...], np.float64)
    mask = np.asarray(seg).reshape(-1) != 0
    e_np, _ = np_route(logits, top_k=2, score_func=score_func)
    scores = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True) if score_func == "softmax"
              else 1 / (1 + np.exp(-logits)))
    np.testing.assert_allclose(float(aux["moe_aux_loss"]),
                               np_aux_loss(scores, e_np, mask, 2, 0.01), rtol=1e-5)
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(float(aux["moe_z_loss"]), 1e-3 * np.mean(lse[mask] ** 2), rtol=1e-5)
    load = np.bincount(e_np[mask].reshape(-1), minlength=8)
    np.testing.assert_array_equal(np.asarray(aux["expert_load"]), load)
    assert load.sum() == 2 * mask.sum()  # padding excluded


def test_aux_loss_is_alpha_for_uniform_router_and_sequence_wise():
    # Uniform scores: P_i = 1/E, so alpha * E * sum_i f_i / E = alpha whatever f is.
    scores = jnp.full((10, 8), 1 / 8)
    experts = jnp.asarray(np.random.default_rng(4).integers(0, 8, (10, 2)))
    np.testing.assert_allclose(float(moe_lib.load_balance_loss(scores, experts, top_k=2, coef=0.3)), 0.3, rtol=1e-6)
    # Sequence-wise (DeepSeek-V3 eq. 17-20): per row, then the mean over non-empty rows.
    moe = make_moe(6, aux_loss_coef=0.1, aux_loss_granularity="sequence")
    x = jax.random.normal(jax.random.key(18), (3, 6, 16))
    seg = jnp.array([[1] * 6, [1] * 2 + [0] * 4, [0] * 6])
    _, aux = apply(moe, x, seg)
    xn = np.asarray(x, np.float64).reshape(3, 6, 16)
    w_r = np.asarray(moe.router.kernel[...], np.float64)
    per_row = []
    for b in range(2):
        lg = xn[b] @ w_r
        e_np, _ = np_route(lg, top_k=2)
        sc = np.exp(lg) / np.exp(lg).sum(-1, keepdims=True)
        per_row.append(np_aux_loss(sc, e_np, np.asarray(seg[b]) != 0, 2, 0.1))
    np.testing.assert_allclose(float(aux["moe_aux_loss"]), np.mean(per_row), rtol=1e-5)


# ----------------------------------------------------------------------------- balancing
def test_update_router_bias_formula():
    moe = make_moe(7, bias_update_rate=0.1)
    b0 = np.array([0.0, 0.5, -0.2, 0.0, 0.1, 0.0, 0.0, 0.3])
    moe.router_bias[...] = jnp.asarray(b0)
    load = np.array([10, 2, 4, 4, 0, 4, 3, 5], np.float32)  # mean 4
    update_router_biases(moe, {"expert_load": jnp.asarray(load)})
    np.testing.assert_allclose(np.asarray(moe.router_bias[...]),
                               b0 + 0.1 * np.sign(load.mean() - load), rtol=1e-6)


def test_aux_loss_free_bias_balances_a_skewed_router():
    moe = make_moe(8, score_func="sigmoid", bias_update_rate=0.02, init_std=0.1)
    # Skew: logits ~ c_e * sum(x) with c decreasing in e, and x shifted positive.
    k = np.asarray(moe.router.kernel[...])
    moe.router.kernel[...] = jnp.asarray(k + np.linspace(0.15, -0.15, 8)[None, :])
    x = jax.random.normal(jax.random.key(19), (4, 16, 16)) + 1.0

    @nnx.jit
    def step(m, x):
        _, aux = m(x)
        update_router_biases(m, aux)
        return aux["expert_load"]

    def imbalance(load):
        load = np.asarray(load)
        return load.max() / load.mean()

    first = imbalance(step(moe, x))
    for _ in range(60):
        last = imbalance(step(moe, x))
    assert first > 3.0, first
    assert last < 1.6 and last < first / 2, (first, last)


def test_update_router_biases_walks_model_layers():
    class Stack(nnx.Module):
        def __init__(self):
            self.layers = nnx.List([make_moe(i, bias_update_rate=1.0) for i in range(11)])

    model = Stack()
    loads = np.zeros((11, 8), np.float32)
    loads[np.arange(11), np.arange(11) % 8] = 8.0  # layer l overloads expert l % 8
    update_router_biases(model, {"expert_load": jnp.asarray(loads)})
    for i, layer in enumerate(model.layers):  # layers 2 and 10 are not swapped (natural order)
        np.testing.assert_array_equal(np.asarray(layer.router_bias[...]), np.sign(1.0 - loads[i]))
    with pytest.raises(ValueError, match="expert_load"):
        update_router_biases(model, {"expert_load": jnp.zeros((3, 8))})


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("overrides,field", [
    (dict(top_k=9), "top_k"),
    (dict(n_group=3), "n_group"),
    (dict(n_group=2, topk_group=3), "topk_group"),
    (dict(n_group=4, topk_group=1, top_k=3), "top_k"),
    (dict(score_func="relu"), "score_func"),
    (dict(dispatch="einsum"), "dispatch"),
    (dict(dispatch="capacity", capacity_factor=0.0), "capacity_factor"),
    (dict(dispatch="capacity", capacity_factor=None), "capacity_factor"),
    (dict(dispatch="dropless", capacity_factor=1.25), "capacity_factor"),
    (dict(num_experts=0), "num_experts"),
    (dict(aux_loss_granularity="token"), "aux_loss_granularity"),
    (dict(gmm_impl="triton"), "gmm_impl"),
])
def test_bad_config_raises(overrides, field):
    with pytest.raises(ValueError, match=f"moe.{field}"):
        make_moe(0, **overrides)


def test_bad_segment_ids_shape_raises():
    with pytest.raises(ValueError, match="segment_ids"):
        make_moe(0)(jnp.ones((2, 3, 16)), segment_ids=jnp.ones((2, 4), jnp.int32))


def test_update_router_biases_stacked_layers():
    """A MoE stacked over L layers (nnx.vmap, as scan_layers builds it): bias [L, E]."""
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r):
        return MoE(make_cfg(bias_update_rate=0.25), rngs=r)

    stacked = make(nnx.Rngs(0))
    assert stacked.router_bias.shape == (3, 8)
    loads = np.random.default_rng(5).integers(0, 9, (3, 8)).astype(np.float32)
    update_router_biases(stacked, {"layers": {"expert_load": jnp.asarray(loads)}})
    np.testing.assert_array_equal(np.asarray(stacked.router_bias[...]),
                                  0.25 * np.sign(loads.mean(-1, keepdims=True) - loads))


@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_update_router_biases_from_model_aux(scan):
    """Interface with arch/model.py: its aux (per-layer list, or stacked when scanned)."""
    from arch.model import build_model
    from configs.deepseek_v3 import get_config

    cfg = get_config("tiny").model
    cfg.moe.bias_update_rate = 0.5
    cfg.num_layers, cfg.d_model, cfg.mlp_dim, cfg.vocab_size = 3, 32, 32, 64  # small, quick
    if scan:
        cfg.moe.first_k_dense, cfg.scan_layers = 0, True
    model = build_model(cfg, 0)
    tokens = jax.random.randint(jax.random.key(21), (2, 8), 0, cfg.vocab_size)
    _, aux = nnx.jit(lambda m, t: m(t))(model, tokens)
    layers = aux["layers"]
    loads = (np.asarray(layers["expert_load"]) if scan else
             np.stack([np.asarray(a["expert_load"]) for a in layers if "expert_load" in a]))
    assert (loads.sum(-1) == 2 * 8 * cfg.moe.top_k).all()
    update_router_biases(model, aux)
    biases = np.concatenate([np.asarray(m.router_bias[...]).reshape(-1, cfg.moe.num_experts)
                             for _, m in moe_lib.moe_modules(model)])
    np.testing.assert_array_equal(biases, 0.5 * np.sign(loads.mean(-1, keepdims=True) - loads))
