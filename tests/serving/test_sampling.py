"""Sampling filters against a per-row numpy reference written from the definitions."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serving.sampling import (
    SamplingParams,
    filter_logits,
    request_keys,
    sample_tokens,
    top_k_filter,
    top_p_filter,
)

_sample = jax.jit(sample_tokens)


def np_top_k(row, k):
    """Keep the k largest logits (and anything tied with the k-th)."""
    if k <= 0:
        return row.copy()
    kth = sorted(row, reverse=True)[min(k, len(row)) - 1]
    return np.where(row >= kth, row, -np.inf)


def np_top_p(row, p):
    """Smallest set of most probable tokens whose probability reaches p (ties with the last kept)."""
    if p >= 1:
        return row.copy()
    probs = np.exp(row - row.max())
    probs /= probs.sum()
    order = np.argsort(-row, kind="stable")
    mass, kept = 0.0, []
    for i in order:
        kept.append(i)
        mass += probs[i]
        if mass >= p:
            break
    threshold = min(row[i] for i in kept)
    return np.where(row >= threshold, row, -np.inf)


def random_logits(rows=6, vocab=11, seed=0):
    x = np.random.default_rng(seed).normal(size=(rows, vocab)).astype(np.float32) * 2
    if rows >= 3:
        x[1, 3] = x[1, 7] = x[1].max() + 1.0  # a tie at the top
        x[2, :4] = 0.5  # a tie in the middle
    return x


def test_top_k_matches_numpy():
    logits = random_logits()
    ks = np.array([0, 1, 3, 4, 11, 20])
    got = np.asarray(top_k_filter(jnp.asarray(logits), jnp.asarray(ks)))
    want = np.stack([np_top_k(r, k) for r, k in zip(logits, ks, strict=True)])
    np.testing.assert_array_equal(got, want)


def test_top_p_matches_numpy():
    logits = random_logits(rows=8)
    ps = np.array([1.0, 0.05, 0.3, 0.5, 0.7, 0.9, 0.99, 0.6], np.float32)
    got = np.asarray(top_p_filter(jnp.asarray(logits), jnp.asarray(ps)))
    want = np.stack([np_top_p(r, p) for r, p in zip(logits, ps, strict=True)])
    np.testing.assert_array_equal(got, want)


def test_temperature_then_top_k_then_top_p():
    logits = random_logits(rows=4, seed=1)
    t = np.array([0.5, 1.0, 2.0, 0.0], np.float32)
    k = np.array([5, 0, 3, 2])
    p = np.array([0.8, 0.6, 1.0, 0.5], np.float32)
    got = np.asarray(filter_logits(jnp.asarray(logits), jnp.asarray(t), jnp.asarray(k), jnp.asarray(p)))
    want = np.stack([np_top_p(np_top_k(r / (ti if ti > 0 else 1.0), ki), pi)
                     for r, ti, ki, pi in zip(logits, t, k, p, strict=True)])
    chex.assert_trees_all_close(got, want, rtol=1e-6)


def test_samples_follow_the_filtered_distribution():
    """Empirical frequencies of 20k draws vs softmax of the numpy-filtered logits."""
    n = 20_000
    row = random_logits(rows=3, seed=2)[1]  # with a tie at the top
    logits = jnp.broadcast_to(jnp.asarray(row), (n, row.size))
    keys = request_keys(jnp.zeros(n, jnp.int32), jnp.arange(n))
    t, k, p = 0.7, 6, 0.9
    toks = np.asarray(_sample(logits, keys, jnp.full(n, t), jnp.full(n, k), jnp.full(n, p)))
    kept = np_top_p(np_top_k(row / t, k), p)
    probs = np.exp(kept - kept.max())
    probs /= probs.sum()
    freq = np.bincount(toks, minlength=row.size) / n
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(probs))  # never a filtered token
    np.testing.assert_allclose(freq, probs, atol=4 * np.sqrt(0.25 / n))  # 4 sigma


def test_greedy_rows_take_the_argmax_and_seeds_are_per_request():
    logits = jnp.asarray(random_logits(rows=4, vocab=50, seed=3))
    temp = jnp.array([0.0, 1.0, 1.0, 1.0])
    k, p = jnp.zeros(4, jnp.int32), jnp.ones(4)
    seeds, steps = jnp.array([5, 5, 5, 9]), jnp.array([0, 0, 1, 0])
    toks = np.asarray(_sample(logits, request_keys(seeds, steps), temp, k, p))
    assert toks[0] == int(jnp.argmax(logits[0]))
    # A row's token depends on its own (seed, step) only, not on the other rows.
    for i in range(1, 4):
        alone = _sample(logits[i:i + 1], request_keys(seeds[i:i + 1], steps[i:i + 1]),
                              temp[i:i + 1], k[:1], p[:1])
        assert int(alone[0]) == toks[i]
    # Equal (seed, step) pairs give equal keys (rows 0, 1), different pairs different keys.
    kd = np.asarray(jax.random.key_data(request_keys(seeds, steps)))
    np.testing.assert_array_equal(kd[0], kd[1])
    assert len({tuple(x.tolist()) for x in kd[1:]}) == 3


def test_all_greedy_batch_compiles_no_sort_and_no_conditional():
    # The engine says on the host that a batch is all greedy; the compiled step must
    # then hold neither the filters' sorts nor a device-side branch (a conditional
    # makes XLA on a GPU wait for its predicate on the host every step).
    logits = jnp.asarray(random_logits(rows=3, vocab=40, seed=1))
    zeros, ones = jnp.zeros(3), jnp.ones(3)
    args = (logits, request_keys(jnp.arange(3), jnp.zeros(3, jnp.int32)), zeros,
            jnp.zeros(3, jnp.int32), ones)
    fn = jax.jit(sample_tokens, static_argnames="any_sampled")
    greedy_hlo = fn.lower(*args, any_sampled=False).as_text()
    assert "sort" not in greedy_hlo and "conditional" not in greedy_hlo
    assert "sort" in fn.lower(*args, any_sampled=True).as_text()
    want = np.argmax(np.asarray(logits), axis=-1)
    np.testing.assert_array_equal(fn(*args, any_sampled=False), want)
    np.testing.assert_array_equal(fn(*args, any_sampled=True), want)  # temperature 0 rows


def test_sampling_params_validation():
    with pytest.raises(ValueError, match=r"unknown sampling parameter\(s\) \['top_q'\]"):
        SamplingParams.from_kwargs(top_q=0.5)
    for bad, match in [(dict(temperature=-1), "temperature=-1"), (dict(top_k=-2), "top_k=-2"),
                       (dict(top_p=0.0), "top_p=0.0"), (dict(max_new_tokens=0), "max_new_tokens=0"),
                       (dict(seed=-1), "seed=-1"), (dict(stop_tokens=(1, -3)), "stop_tokens")]:
        with pytest.raises(ValueError, match=match):
            SamplingParams(**bad)
    assert SamplingParams(stop_tokens=[3, 4]).stop_tokens == (3, 4)
