"""KV caches: decoding with a cache gives the tokens of the full forward pass.

Reference: the model without any cache. A causal model's logits at position t depend
only on tokens 0..t, so the full forward over the final sequence gives, at every
position, what recomputing the whole prefix at that step gives (one step-by-step
recompute test pins this too). Every tiny family config is shrunk (2 layers, d 64)
and decoded past its sliding window / chunk, in f32, with a ragged batch (rows of
different prompt lengths).
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arch import build_model
from arch.attention import Attention
from arch.mla import MLAttention
from arch.model import freeze
from configs import bert
from pallas_kernels.flash_attention.reference import mha_reference
from serving.cache import DenseKV, PagedKV, RollingKV, init_cache, reset_rows, set_page_tables

WINDOW = 4  # sliding window and chunk size in the shrunk configs: decoding crosses several
SHRINK = dict(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
              max_seq_len=32, init_std=0.1)
FAMILY_OVERRIDES = {
    "llama3": {},
    "mistral": dict(sliding_window=WINDOW),
    "mixtral": {},
    "qwen": {},
    "gemma3": dict(layer_pattern=("local", "global"), sliding_window=WINDOW,
                   query_pre_attn_scalar=16),
    "olmo2": dict(num_kv_heads=4),
    "smollm3": dict(layer_pattern=("global", "nope")),
    "deepseek_v3": dict(num_kv_heads=4),
    "llama4": dict(layer_pattern=("chunked", "nope"), chunk_size=WINDOW),
    "gpt2": dict(num_kv_heads=4),
}
WINDOWED = ("mistral", "gemma3", "llama4")


def tiny_model_config(family: str):
    cfg = __import__(f"configs.{family}", fromlist=["get_config"]).get_config("tiny").model
    cfg.update(**{**SHRINK, **FAMILY_OVERRIDES[family]})
    if cfg.moe is not None:
        cfg.moe.update(expert_mlp_dim=32, dense_mlp_dim=None)
    if cfg.mla is not None:
        cfg.mla.update(q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                       v_head_dim=8)
    return freeze(cfg)  # hashable: layers built from it go through jit as static data


# Paged cases that exercise a distinct path (GQA kernel decode, window, chunks, MLA latent)
# run always; the other families' paged cases repeat those paths and run with `-m slow`.
PAGED_FAST = ("llama3", "mistral", "llama4", "deepseek_v3")


def kinds_for(family):
    return ["dense", "paged"] + (["rolling"] if family in WINDOWED else [])


CASES = [pytest.param(f, k, id=f"{f}-{k}",
                      marks=[pytest.mark.slow] if k == "paged" and f not in PAGED_FAST else [])
         for f in FAMILY_OVERRIDES for k in kinds_for(f)]
PROMPT_LENS = (5, 3)  # a ragged batch: row 1 is right-padded
NEW_TOKENS = 7


def with_contiguous_pages(cache):
    """Paged caches: row b owns pages b*M .. b*M + M - 1."""
    if not isinstance(cache[0], PagedKV):
        return cache
    b, m = cache[0].page_table.shape
    return set_page_tables(cache, np.arange(b * m).reshape(b, m), np.zeros(b))


@functools.partial(jax.jit, static_argnums=(0, 5))
def greedy_decode(graphdef, state, cache, prompt, prompt_seg, steps):
    """Prefill a right-padded prompt batch, then `steps` greedy decode steps (lax.scan).

    Returns tokens [B, steps] and the logits that chose them [B, steps, V].
    """
    model = nnx.merge(graphdef, state)
    b, t = prompt.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    logits, aux = model(prompt, positions, prompt_seg, cache=cache)
    last = prompt_seg.sum(axis=1) - 1
    first = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]  # [B, V]

    def step(carry, _):
        cache, logits = carry
        tok = jnp.argmax(logits, axis=-1)  # [B]
        out, aux = model(tok[:, None], cache=cache)  # positions continue from the cache
        return (aux["cache"], out[:, 0]), (tok, logits)

    _, (toks, used) = jax.lax.scan(step, (aux["cache"], first), None, length=steps)
    return toks.T, used.transpose(1, 0, 2)


@functools.partial(jax.jit, static_argnums=(0,))
def full_forward(graphdef, state, tokens):
    logits, _ = nnx.merge(graphdef, state)(tokens)
    return logits


@functools.lru_cache(maxsize=None)
def family_model(family):
    cfg = tiny_model_config(family)
    return cfg, build_model(cfg, nnx.Rngs(params=1))


def prompts_for(cfg):
    rng = np.random.default_rng(0)
    prompt = np.zeros((len(PROMPT_LENS), max(PROMPT_LENS)), np.int32)
    seg = np.zeros_like(prompt)
    for i, n in enumerate(PROMPT_LENS):
        prompt[i, :n] = rng.integers(0, cfg.vocab_size, n)
        seg[i, :n] = 1
    return prompt, seg


@pytest.mark.parametrize("family,kind", CASES)
def test_greedy_decode_matches_full_forward(family, kind):
    cfg, model = family_model(family)
    prompt, seg = prompts_for(cfg)
    cache = with_contiguous_pages(init_cache(cfg, batch=2, max_len=16, kind=kind, page_size=4))
    graphdef, state = nnx.split(model)
    toks, used = jax.device_get(greedy_decode(graphdef, state, cache, jnp.asarray(prompt),
                                              jnp.asarray(seg), NEW_TOKENS))
    # Reference: full forward (no cache) over each row's final sequence, padded at the end.
    total = max(PROMPT_LENS) + NEW_TOKENS
    seqs = np.zeros((2, total), np.int32)
    for i, n in enumerate(PROMPT_LENS):
        seqs[i, :n + NEW_TOKENS] = np.concatenate([prompt[i, :n], toks[i]])
    ref = full_forward(graphdef, state, jnp.asarray(seqs))
    for i, n in enumerate(PROMPT_LENS):
        ref_logits = np.asarray(ref[i, n - 1:n - 1 + NEW_TOKENS])  # logits that pick token n+j
        np.testing.assert_array_equal(toks[i], ref_logits.argmax(-1))
        chex.assert_trees_all_close(used[i], ref_logits, atol=2e-4, rtol=2e-4)


def test_step_by_step_recompute_equals_cache():
    """The literal check: recompute the whole prefix every step (trainer/sample.py)."""
    from trainer.sample import generate

    cfg, model = family_model("gemma3")
    prompt, seg = prompts_for(cfg)
    cache = init_cache(cfg, batch=2, max_len=16, kind="rolling")
    toks, _ = greedy_decode(*nnx.split(model), cache, jnp.asarray(prompt), jnp.asarray(seg),
                            NEW_TOKENS)
    ref = generate(model, prompt[0, :PROMPT_LENS[0]], max_new_tokens=NEW_TOKENS)
    np.testing.assert_array_equal(np.asarray(toks[0]), ref[PROMPT_LENS[0]:])


# ---------------------------------------------------------------------------- layer level


def _layer_inputs(cfg, b, t, seed=0):
    x = jax.random.normal(jax.random.key(seed), (b, t, cfg.d_model))
    return x, jnp.broadcast_to(jnp.arange(t), (b, t))


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("absorb",))
def _layer_call(graphdef, state, x, pos, cache=None, absorb=None):
    """One attention layer call (jitted: eager dispatch of many small ops is slower)."""
    kw = {} if absorb is None else {"absorb": absorb}
    y, aux = nnx.merge(graphdef, state)(x, positions=pos, cache=cache, **kw)
    return y, aux.get("cache")


def _full_layer(layer, x, pos, **kw):
    return _layer_call(*nnx.split(layer), x, pos, **kw)[0]


def _decode_layer(layer, cache, x, chunks, **kw):
    """Feed x [B, T, D] in chunks of the given lengths; outputs concatenated [B, T, D]."""
    graphdef, state = nnx.split(layer)
    outs, start = [], 0
    for n in chunks:
        pos = jnp.broadcast_to(jnp.arange(start, start + n), (x.shape[0], n))
        y, cache = _layer_call(graphdef, state, x[:, start:start + n], pos, cache, **kw)
        outs.append(y)
        start += n
    return jnp.concatenate(outs, axis=1), cache


def test_rolling_equals_dense_for_sliding_window():
    cfg = tiny_model_config("mistral")
    layer = Attention(cfg, rngs=nnx.Rngs(0), layer_kind="local")
    x, pos = _layer_inputs(cfg, 2, 14)
    full = _full_layer(layer, x, pos)
    chunks = (6, 1, 1, 5, 1)  # a prefill longer than the window, decode, a second long chunk
    dense, _ = _decode_layer(layer, init_cache(cfg, 2, 16, "dense")[0], x, chunks)
    rolling, rc = _decode_layer(layer, init_cache(cfg, 2, 16, "rolling")[0], x, chunks)
    assert isinstance(rc, RollingKV)
    chex.assert_shape(rc.k, (2, WINDOW, cfg.num_kv_heads, cfg.head_dim))  # memory = window
    chex.assert_trees_all_close(rolling, dense, atol=1e-5)
    chex.assert_trees_all_close(dense, full, atol=1e-5)


def test_rolling_chunked_layer_equals_full():
    cfg = tiny_model_config("llama4")
    layer = Attention(cfg, rngs=nnx.Rngs(0), layer_kind="chunked")
    x, pos = _layer_inputs(cfg, 1, 12)
    full = _full_layer(layer, x, pos)
    rolling, rc = _decode_layer(layer, init_cache(cfg, 1, 16, "rolling")[0], x, (5, 1, 1, 5))
    chex.assert_shape(rc.k, (1, WINDOW, cfg.num_kv_heads, cfg.head_dim))
    chex.assert_trees_all_close(rolling, full, atol=1e-5)


def test_mla_latent_cache_absorbed_equals_naive():
    cfg = tiny_model_config("deepseek_v3")
    layer = MLAttention(cfg, rngs=nnx.Rngs(0))
    x, pos = _layer_inputs(cfg, 2, 9)
    full = _full_layer(layer, x, pos, absorb=False)
    cache = init_cache(cfg, 2, 16)[0]
    # The latent cache holds c_KV and the shared RoPE key only: (16 + 4) numbers per token
    # instead of 2 * heads * head_dim.
    chex.assert_shape(cache.k, (2, 16, 1, cfg.mla.kv_lora_rank))
    chex.assert_shape(cache.v, (2, 16, 1, cfg.mla.qk_rope_head_dim))
    absorbed, _ = _decode_layer(layer, cache, x, (4, 1, 1, 1, 1, 1), absorb=True)
    naive, _ = _decode_layer(layer, cache, x, (4, 1, 1, 1, 1, 1), absorb=False)
    default, _ = _decode_layer(layer, cache, x, (4, 1, 1, 1, 1, 1))  # naive prefill, absorbed decode
    chex.assert_trees_all_close(absorbed, naive, atol=1e-5)
    chex.assert_trees_all_close(naive, full, atol=1e-5)
    chex.assert_trees_all_close(default, full, atol=1e-5)


def test_paged_decode_kernel_equals_dense_cache():
    """PagedKV decode runs paged_attention (the Pallas GPU kernel, interpreted on CPU)."""
    b, hkv, h, d, ps = 3, 2, 4, 16, 4
    lengths = np.array([5, 1, 9])
    keys = jax.random.split(jax.random.key(0), 4)
    k_all = jax.random.normal(keys[0], (b, 10, hkv, d))
    v_all = jax.random.normal(keys[1], (b, 10, hkv, d))
    q = jax.random.normal(keys[2], (b, 1, h, d))
    seg = (np.arange(10)[None] < lengths[:, None]).astype(np.int32)
    pos = jnp.broadcast_to(jnp.arange(10), (b, 10))
    paged = PagedKV.create(b, 16, (hkv, d), (hkv, d), jnp.float32, page_size=ps, num_pages=12)
    table = np.asarray(jax.random.permutation(keys[3], 12)).reshape(b, 4).astype(np.int32)
    (paged,) = set_page_tables((paged,), table, np.zeros(b))
    paged, _ = paged.update(k_all, v_all, positions=pos, segment_ids=seg)  # prefill, ragged
    dpos = jnp.asarray(lengths)[:, None]
    k_new, v_new = k_all[:, :1] * 0.5, v_all[:, :1] * 2.0
    o, paged = paged.attend(q, k_new, v_new, positions=dpos, causal=True, sliding_window=3,
                            impl="pallas_gpu")
    # Reference: the dense sequences with the new token at position lengths[b].
    rows = np.arange(b)
    k_ref = k_all.at[rows, lengths].set(k_new[:, 0])
    v_ref = v_all.at[rows, lengths].set(v_new[:, 0])
    ref = mha_reference(q, k_ref, v_ref, causal=True, sliding_window=3, q_positions=dpos,
                        kv_positions=pos, segment_ids=(jnp.ones((b, 1), jnp.int32), seg + (pos == dpos)))
    chex.assert_trees_all_close(o, ref, atol=1e-5)
    np.testing.assert_array_equal(paged.lengths, lengths + 1)


def test_reset_rows_empties_only_those_rows():
    cfg = tiny_model_config("llama3")
    layer = Attention(cfg, rngs=nnx.Rngs(0))
    x, pos = _layer_inputs(cfg, 2, 6)
    for kind in ("dense", "rolling"):
        cfg_w = tiny_model_config("mistral")
        c = init_cache(cfg_w if kind == "rolling" else cfg, 2, 16, kind)
        graphdef, state = nnx.split(layer)
        _, filled = _layer_call(graphdef, state, x, pos, c[0])
        (fresh,) = reset_rows((filled,), np.array([True, False]))
        np.testing.assert_array_equal(fresh.lengths, [0, 6])
        # Row 0 restarts: its new output is that of a fresh sequence.
        y, _ = _layer_call(graphdef, state, x[:, :2], pos[:, :2], fresh)
        y_ref = _full_layer(layer, x[:1, :2], pos[:1, :2])
        chex.assert_trees_all_close(y[0], y_ref[0], atol=1e-5)


# ---------------------------------------------------------------------------- errors


def test_bad_requests_raise_value_error():
    cfg = tiny_model_config("llama3")
    with pytest.raises(ValueError, match="kind='sparse' must be one of"):
        init_cache(cfg, 1, 8, kind="sparse")
    with pytest.raises(ValueError, match="max_len=64 must be <= model.max_seq_len=32"):
        init_cache(cfg, 1, 64)
    scanned = tiny_model_config("llama3").as_configdict()
    scanned.scan_layers = True
    with pytest.raises(ValueError, match="scan_layers=True is not supported"):
        init_cache(scanned, 1, 8)
    with pytest.raises(ValueError, match="scan_layers=False"):  # a scanned model given a cache
        build_model(scanned)(jnp.zeros((1, 2), jnp.int32), cache=init_cache(cfg, 1, 8))
    with pytest.raises(ValueError, match="causal decoder"):
        init_cache(bert.get_config("tiny").model, 1, 8)
    cache = init_cache(cfg, 1, 8)
    layer = Attention(cfg, rngs=nnx.Rngs(0))
    x, pos = _layer_inputs(cfg, 1, 9)
    with pytest.raises(ValueError, match="sequence length 9 exceeds the dense cache capacity 8"):
        layer(x, positions=pos, cache=cache[0])
    assert isinstance(cache[0], DenseKV)
