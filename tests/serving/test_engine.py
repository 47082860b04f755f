"""The generation engine against a plain reference: each request alone, recomputed.

The reference decodes one request at a time with no cache at all: every step runs
the full forward pass over a fixed-length buffer (causal, so the unfilled tail does
not matter) and picks the next token with the documented per-request key
fold_in(key(seed), i). The engine must give exactly those tokens whatever else is in
the batch, whenever a request joins, whatever cache layout, and through prefix
sharing, eviction and preemption.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arch import build_model
from arch.model import freeze
from configs.llama3 import get_config as llama3_config
from configs.mistral import get_config as mistral_config
from serving import engine as engine_module
from serving.engine import Engine
from serving.sampling import SamplingParams, request_keys, sample_tokens

MAX_SEQ = 32


def tiny_model(get_config, **overrides):
    cfg = get_config("tiny").model
    cfg.update(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
               max_seq_len=MAX_SEQ, init_std=0.1, **overrides)
    return build_model(freeze(cfg), nnx.Rngs(params=3))


@functools.lru_cache(maxsize=None)
def llama():
    return tiny_model(llama3_config)


@functools.lru_cache(maxsize=None)
def mistral():
    return tiny_model(mistral_config, sliding_window=4)


@functools.partial(jax.jit, static_argnums=(0,))
def _logits_at(graphdef, state, buf, index):
    logits, _ = nnx.merge(graphdef, state)(buf)  # [1, MAX_SEQ, V]
    return logits[0, index]


_sample = jax.jit(sample_tokens)


def reference_generate(model, prompt, **params):
    """One request alone, full forward pass at every step."""
    sp = SamplingParams(**params)
    graphdef, state = nnx.split(model)
    buf = np.zeros((1, MAX_SEQ), np.int32)
    buf[0, :len(prompt)] = prompt
    n, out = len(prompt), []
    for i in range(sp.max_new_tokens):
        logits = _logits_at(graphdef, state, jnp.asarray(buf), n - 1)
        if sp.temperature == 0:
            tok = int(jnp.argmax(logits))
        else:
            keys = request_keys(jnp.array([sp.seed]), jnp.array([i]))
            tok = int(_sample(logits[None], keys, jnp.array([sp.temperature], jnp.float32),
                              jnp.array([sp.top_k]), jnp.array([sp.top_p], jnp.float32))[0])
        out.append(tok)
        buf[0, n] = tok
        n += 1
        if tok in sp.stop_tokens:
            break
    return out


def make_requests(num, seed=0, shared_prefix=()):
    """Prompts of different lengths, budgets and sampling settings."""
    rng = np.random.default_rng(seed)
    reqs = []
    for i in range(num):
        prompt = list(shared_prefix) + [int(t) for t in rng.integers(0, 256, int(rng.integers(1, 10)))]
        params = dict(max_new_tokens=int(rng.integers(1, 9)))
        if i % 3 == 1:
            params.update(temperature=0.8, top_k=int(rng.integers(0, 40)), top_p=0.9, seed=i)
        elif i % 3 == 2:
            params.update(temperature=1.0, seed=1000 + i)
        reqs.append((prompt, params))
    return reqs


def run_staggered(engine, reqs, waves=(6, 5, 5)):
    """Submit in waves with decode steps between: requests join a running batch."""
    rids, i = [], 0
    for wave in waves:
        for prompt, params in reqs[i:i + wave]:
            rids.append(engine.submit(prompt, **params))
        i += wave
        for _ in range(2):
            engine.step()
    engine.run()
    return [engine.result(r) for r in rids]


@pytest.fixture(scope="module")
def llama_requests():
    reqs = make_requests(16)
    # A stop token: the 3rd token the reference generates for request 0 (greedy).
    prompt, params = reqs[0]
    params.update(max_new_tokens=8)
    stop = reference_generate(llama(), prompt, **params)[2]
    params.update(stop_tokens=(stop,))
    # Two requests that differ only in seed, and one that repeats a seed.
    reqs[4] = (reqs[1][0], {**reqs[1][1], "seed": 77})
    reqs[7] = (reqs[1][0], dict(reqs[1][1]))
    refs = [reference_generate(llama(), p, **kw) for p, kw in reqs]
    return reqs, refs


@pytest.mark.parametrize("decode_steps", [1, 8])  # a host round trip per token, or a device loop
def test_continuous_batching_equals_each_request_alone(llama_requests, decode_steps):
    reqs, refs = llama_requests
    engine = Engine(llama(), max_slots=4, max_len=MAX_SEQ, min_bucket=16, decode_steps=decode_steps)
    outs = run_staggered(engine, reqs)
    assert outs == refs
    assert len(outs[0]) <= 3 and outs[0][-1] == reqs[0][1]["stop_tokens"][0]  # stopped early
    assert outs[7] == outs[1]  # same prompt and seed, different batch rows and times
    assert engine.idle and engine.stats.decode_tokens > 0


@pytest.mark.parametrize("radix", [False, True])
def test_paged_engine_equals_each_request_alone(llama_requests, radix):
    reqs, refs = llama_requests
    engine = Engine(llama(), max_slots=4, max_len=MAX_SEQ, cache_kind="paged", page_size=4,
                    radix=radix, min_bucket=16)
    assert run_staggered(engine, reqs) == refs


def test_rolling_cache_engine_equals_each_request_alone():
    reqs = make_requests(6, seed=1)
    refs = [reference_generate(mistral(), p, **kw) for p, kw in reqs]
    engine = Engine(mistral(), max_slots=3, max_len=MAX_SEQ, cache_kind="rolling", min_bucket=16)
    assert run_staggered(engine, reqs, waves=(3, 3)) == refs


def test_radix_prefix_sharing_gives_the_same_tokens_and_skips_prefill():
    prefix = list(range(40, 52))  # 12 tokens = 3 pages of 4
    reqs = make_requests(8, seed=2, shared_prefix=prefix)
    refs = [reference_generate(llama(), p, **kw) for p, kw in reqs]
    outs, stats = {}, {}
    for radix in (False, True):
        engine = Engine(llama(), max_slots=2, max_len=MAX_SEQ, cache_kind="paged", page_size=4,
                        radix=radix, min_bucket=32)
        rids = [engine.submit(p, **kw) for p, kw in reqs]
        engine.run()
        outs[radix] = [engine.result(r) for r in rids]
        stats[radix] = engine.stats
    assert outs[False] == refs and outs[True] == refs
    assert stats[False].cached_prompt_tokens == 0
    # The first two requests run together and miss; the other six find the 3 pages.
    assert stats[True].cached_prompt_tokens >= 6 * len(prefix)
    assert stats[True].prefill_tokens <= stats[False].prefill_tokens - 6 * len(prefix)


def test_cascade_decode_over_a_shared_prefix_gives_the_same_tokens(monkeypatch):
    """Rows that share radix-cached prompt pages decode with the cascade kernel (the
    prefix read once per chunk of rows) and still give each request's own tokens; the
    engine's paged_block_sizes reach the kernel calls."""
    import serving.engine as engine_mod
    from pallas_kernels.paged_attention import cascade as cascade_mod
    from pallas_kernels.paged_attention import gpu as paged_gpu

    found, tilings = [], []
    original = engine_mod.find_shared_prefix
    monkeypatch.setattr(engine_mod, "find_shared_prefix",
                        lambda *a, **kw: (found.append(original(*a, **kw)), found[-1])[1])
    kernel = cascade_mod.paged_attention
    monkeypatch.setattr(cascade_mod, "paged_attention", lambda *a, **kw: (
        tilings.append(kw["block_sizes"]), kernel(*a, **kw))[1])
    tiles = paged_gpu.BlockSizes(kernel="triton")  # ignored by the CPU reference backend
    prefix = list(range(40, 56))  # 16 tokens = 4 pages of 4
    reqs = make_requests(8, seed=4, shared_prefix=prefix)
    refs = [reference_generate(llama(), p, **kw) for p, kw in reqs]
    engine = Engine(llama(), max_slots=4, max_len=MAX_SEQ, cache_kind="paged", page_size=4,
                    radix=True, min_bucket=32, paged_block_sizes=tiles)
    rids = [engine.submit(p, **kw) for p, kw in reqs]
    engine.run()
    assert [engine.result(r) for r in rids] == refs
    assert tilings and all(t is tiles for t in tilings)
    shared = [p for p in found if p is not None]
    assert shared and max(int(p.shares.sum()) for p in shared) >= 3
    assert max(int(p.length) for p in shared) >= len(prefix)


@pytest.mark.parametrize("radix", [False, True])
def test_pool_exhaustion_waits_and_preempts_without_changing_tokens(radix):
    # 6 pages of 4 tokens; every request grows to 3 pages: at most 2 fit at once, so
    # requests wait at admission and running ones are preempted and recomputed.
    rng = np.random.default_rng(3)
    reqs = [([int(t) for t in rng.integers(0, 256, 5)],
             dict(max_new_tokens=7, temperature=0.7 * (i % 2), seed=i)) for i in range(5)]
    refs = [reference_generate(llama(), p, **kw) for p, kw in reqs]
    engine = Engine(llama(), max_slots=4, max_len=16, cache_kind="paged", page_size=4,
                    num_pages=6, radix=radix, min_bucket=16)
    rids = [engine.submit(p, **kw) for p, kw in reqs]
    engine.run()
    assert [engine.result(r) for r in rids] == refs
    assert engine.stats.preemptions > 0
    assert engine.tables.pool.num_free + (engine.radix.num_cached_pages if radix else 0) == 6


def test_bad_input_raises_value_error():
    engine = Engine(llama(), max_slots=2, max_len=24)
    with pytest.raises(ValueError, match=f"prompt length 33 exceeds model.max_seq_len={MAX_SEQ}"):
        engine.submit([1] * 33)
    with pytest.raises(ValueError, match="exceeds the engine's max_len=24"):
        engine.submit([1] * 20, max_new_tokens=5)
    with pytest.raises(ValueError, match=r"unknown sampling parameter\(s\) \['temprature'\]"):
        engine.submit([1, 2], temprature=0.5)
    with pytest.raises(ValueError, match="top_p=1.5 must lie in"):
        engine.submit([1, 2], top_p=1.5)
    with pytest.raises(ValueError, match="at least one token"):
        engine.submit([])
    with pytest.raises(ValueError, match="vocab_size"):
        engine.submit([1, 256])
    with pytest.raises(ValueError, match="radix=True needs cache_kind='paged'"):
        Engine(llama(), radix=True)
    with pytest.raises(ValueError, match="cache_kind='sparse' must be one of"):
        Engine(llama(), cache_kind="sparse")
    with pytest.raises(ValueError, match="decode_steps=0 must be a positive int"):
        Engine(llama(), decode_steps=0)
    paged = Engine(llama(), max_slots=1, max_len=24, cache_kind="paged", page_size=4, num_pages=2)
    with pytest.raises(ValueError, match="needs 3 pages; the pool has num_pages=2"):
        paged.submit([1] * 8, max_new_tokens=2)
    assert engine.idle  # nothing was queued by the failures


def test_prefill_buckets_are_powers_of_two_then_multiples_of_the_step(monkeypatch):
    monkeypatch.setattr(engine_module, "BUCKET_STEP", 8)
    engine = Engine(llama(), max_slots=1, max_len=MAX_SEQ, min_bucket=2)
    assert [engine._bucket(n) for n in (1, 3, 5, 8, 9, 17, 31)] == [2, 4, 8, 8, 16, 24, 32]


def test_sample_cli_restores_the_checkpoint_and_generates(tmp_path):
    """sample.py on a train.py-layout workdir: config.json + an orbax checkpoint."""
    import optim
    import sample
    from trainer.checkpoint import Checkpointer, train_state

    cfg = llama3_config("tiny")
    cfg.model.update(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16,
                     mlp_dim=128, max_seq_len=MAX_SEQ, init_std=0.1)
    # Weights unlike the ones cfg.seed would initialise: sample.py must load them.
    model = build_model(freeze(cfg.model), nnx.Rngs(params=cfg.seed + 7))
    tx = optim.build_optimizer(cfg.optim, nnx.state(model, nnx.Param), total_steps=cfg.train.steps)
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    ckpt.save(5, train_state(model, nnx.Optimizer(model, tx, wrt=nnx.Param), jax.random.key(0)), {})
    ckpt.close()
    (tmp_path / "config.json").write_text(cfg.to_json_best_effort(indent=2))

    texts = sample.main([f"--workdir={tmp_path}", "--prompt=ab", "--max_new_tokens=6",
                         "--temperature=0", "--cache=paged"])
    ref = reference_generate(model, [ord("a"), ord("b")], max_new_tokens=6)
    assert texts == ["ab" + bytes(ref).decode("utf-8", errors="replace")]


@pytest.mark.parametrize("family", ["llama3", "deepseek_v3", "gemma3"])
def test_serving_params_cast_changes_no_logit(family):
    """Matrices cast to bf16 once give bit-identical bf16 logits: every use casts anyway
    (the MoE router, which computes in f32, keeps f32 weights)."""
    import importlib

    from serving.engine import serving_params

    cfg = importlib.import_module(f"configs.{family}").get_config("tiny").model
    cfg.update(dtype="bfloat16", max_seq_len=MAX_SEQ)
    model = build_model(freeze(cfg), nnx.Rngs(params=0))
    graphdef, state = nnx.split(model)
    cast = serving_params(state, "bfloat16")
    dtypes = {jax.tree_util.keystr(p): v[...].dtype
              for p, v in jax.tree_util.tree_leaves_with_path(cast, is_leaf=lambda x: isinstance(x, nnx.Variable))}
    assert any(d == jnp.bfloat16 for d in dtypes.values())
    assert all(d == jnp.float32 for k, d in dtypes.items() if "router" in k or "norm" in k)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
    want, _ = _logits_full(graphdef, state, tokens)
    got, _ = _logits_full(graphdef, cast, tokens)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@functools.partial(jax.jit, static_argnums=(0,))
def _logits_full(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def test_request_span_equals_slicing_the_tokens():
    """_Request.span (used by admission on prompts of thousands of tokens) is tokens[lo:hi]."""
    from serving.engine import _Request
    from serving.sampling import SamplingParams

    req = _Request(0, list(range(10)), SamplingParams.from_kwargs(), output=[100, 101, 102])
    for lo in range(0, 14):
        for hi in range(lo, 15):
            assert req.span(lo, hi) == req.tokens[lo:hi], (lo, hi)
