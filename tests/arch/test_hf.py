"""Hugging Face checkpoints: our models against transformers' logits, exact round trips, bad inputs.

The fixtures in tests/fixtures/hf/<name>/ were written by tools/make_hf_fixtures.py with
transformers (eager attention, f32): config.json, model.safetensors, input_ids.npy and the
reference logits.npy. No torch is needed here.
"""
import json
import os
import shutil

import chex
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from arch import build_model, hf
from arch.hf_config import from_hf

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf")
NAMES = sorted(os.listdir(FIXTURES))

_forward = nnx.jit(lambda model, tokens: model(tokens)[0])


def _tensors(path):
    with safe_open(os.path.join(path, "model.safetensors"), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _params(model):
    return {p: np.asarray(v.value) for p, v in nnx.to_flat_state(nnx.state(model))}


def _copy(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(os.path.join(FIXTURES, name), dst)
    return dst


def _rewrite(path, tensors=None, config=None):
    if tensors is not None:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f)


def _config(name):
    with open(os.path.join(FIXTURES, name, "config.json")) as f:
        return json.load(f)


def test_all_families_have_fixtures():
    assert set(NAMES) >= {"llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma3",
                          "olmo2", "deepseek_v3", "gpt2", "mamba2"}


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name):
    path = os.path.join(FIXTURES, name)
    model, cfg = hf.load(path)
    ids, ref = np.load(os.path.join(path, "input_ids.npy")), np.load(os.path.join(path, "logits.npy"))
    logits = _forward(model, jnp.asarray(ids))
    chex.assert_shape(logits, ref.shape)
    chex.assert_trees_all_close(np.asarray(logits), ref, atol=1e-4, rtol=0)


def test_translated_features():
    """The config features the fixtures exist to exercise are really switched on."""
    assert from_hf(_config("mistral")).model.layer_pattern == ("local",)
    g = from_hf(_config("gemma3")).model
    assert g.layer_pattern == ("local", "local", "global") and g.sliding_window == 8
    assert g.rope_scaling.to_dict() == dict(type="linear", factor=2.0) and g.rope_local_theta == 10_000.0
    d = from_hf(_config("deepseek_v3")).model
    assert d.rope_interleaved and d.rope_scaling["type"] == "yarn" and d.moe.n_group == 4
    assert d.mla.q_lora_rank == 32 and d.moe.first_k_dense == 1
    assert from_hf(_config("smollm3")).model.layer_pattern == ("global", "global", "nope")
    assert from_hf(_config("qwen3_moe")).model.moe.first_k_dense == 1
    s = from_hf(_config("mamba2")).model
    # 2 groups of B/C, but transformers' gated norm spans all 8 heads (fixture: n_groups=2).
    assert s.layer_pattern == ("mamba",) and s.ssm.n_groups == 2 and s.ssm.norm_groups == 1
    assert s.ssm.chunk_size == 8 and s.tie_embeddings  # 3 chunks over the 24 tokens


@pytest.mark.parametrize("name", NAMES)
def test_save_round_trip_is_exact(name, tmp_path):
    """save writes back transformers' own tensors bit for bit; loading the export is exact."""
    model, cfg = hf.load(os.path.join(FIXTURES, name))
    hf.save(model, cfg, tmp_path)
    original, exported = _tensors(os.path.join(FIXTURES, name)), _tensors(tmp_path)
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    again, cfg2 = hf.load(tmp_path)
    assert cfg2.model.to_dict() == cfg.model.to_dict()
    a, b = _params(model), _params(again)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


def test_sharded_checkpoint(tmp_path):
    model, cfg = hf.load(os.path.join(FIXTURES, "mixtral"))
    hf.save(model, cfg, tmp_path, max_shard_bytes=200_000)
    shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert len(shards) > 1 and os.path.exists(tmp_path / "model.safetensors.index.json")
    again, _ = hf.load(tmp_path)
    chex.assert_trees_all_equal(_params(again), _params(model))


def test_bf16_checkpoint(tmp_path):
    """bf16 tensors (numpy cannot read them through safetensors) load as the rounded values."""
    path = _copy("llama", tmp_path)
    original = _tensors(path)
    _rewrite(path, {k: v.astype(ml_dtypes.bfloat16) for k, v in original.items()})
    model, _ = hf.load(path)
    emb = np.asarray(model.embed.embedding[...])
    np.testing.assert_array_equal(emb, original["model.embed_tokens.weight"].astype(ml_dtypes.bfloat16)
                                  .astype(np.float32))
    model16, cfg16 = hf.load(path, dtype=jnp.bfloat16)
    assert model16.embed.embedding[...].dtype == jnp.bfloat16 and cfg16.model.dtype == "bfloat16"


def test_scanned_model_saves_per_layer(tmp_path):
    cfg = from_hf(_config("llama"))
    cfg.model.scan_layers = True
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(cfg.model, nnx.Rngs(0))))
    rng = np.random.default_rng(0)  # random values without compiling an initialiser
    state = nnx.from_flat_state([(p, v.replace(value=jnp.asarray(rng.standard_normal(v.value.shape),
                                                                 v.value.dtype)))
                                 for p, v in nnx.to_flat_state(state)])
    model = nnx.merge(graphdef, state)
    hf.save(model, cfg, tmp_path)
    loaded, _ = hf.load(tmp_path)
    stacked = np.asarray(model.stack.layers.attn.q.kernel[...])  # [layers, D, H, Dh]
    for i in range(cfg.model.num_layers):
        np.testing.assert_array_equal(np.asarray(loaded.stack.layers[i].attn.q.kernel[...]), stacked[i])


def test_gpt2_original_names(tmp_path):
    """OpenAI's GPT-2 files: no "transformer." prefix, causal-mask buffers beside the weights."""
    path = _copy("gpt2", tmp_path)
    tensors = {k.removeprefix("transformer."): v for k, v in _tensors(path).items()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    _rewrite(path, tensors)
    chex.assert_trees_all_equal(_params(hf.load(path)[0]), _params(hf.load(os.path.join(FIXTURES, "gpt2"))[0]))


def test_gemma3_multimodal_checkpoint(tmp_path):
    """model_type gemma3: the language model is read from text_config; vision weights skipped."""
    path = _copy("gemma3", tmp_path)
    tensors = {k.replace("model.", "model.language_model.", 1): v for k, v in _tensors(path).items()}
    tensors["model.vision_tower.patch.weight"] = np.zeros((2, 2), np.float32)
    _rewrite(path, tensors, {"model_type": "gemma3", "text_config": _config("gemma3")})
    chex.assert_trees_all_equal(_params(hf.load(path)[0]), _params(hf.load(os.path.join(FIXTURES, "gemma3"))[0]))


def test_transformers4_config_spelling():
    """rope_theta + rope_scaling (transformers 4) read the same as rope_parameters (5)."""
    new = _config("llama")
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    params = dict(new["rope_parameters"])
    old["rope_theta"] = params.pop("rope_theta")
    old["rope_scaling"] = params
    assert from_hf(old).model.to_dict() == from_hf(new).model.to_dict()


# ---------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("field,value", [("model_type", "bloom"), ("hidden_act", "relu"),
                                         ("rope_parameters", {"rope_type": "longrope", "rope_theta": 1e4}),
                                         ("layer_types", ["chunked_attention"] * 2)])
def test_unsupported_config_value(field, value, tmp_path):
    path = _copy("llama", tmp_path)
    _rewrite(path, config=dict(_config("llama"), **{field: value}))
    with pytest.raises(ValueError, match=field.split("_parameters")[0]):
        hf.load(path)


def test_missing_tensor(tmp_path):
    path = _copy("mixtral", tmp_path)
    tensors = _tensors(path)
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    _rewrite(path, tensors)
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.block_sparse_moe\.experts\.3\.w2"):
        hf.load(path)


def test_unexpected_tensor(tmp_path):
    path = _copy("llama", tmp_path)
    tensors = _tensors(path)
    tensors["model.layers.0.self_attn.extra_proj.weight"] = np.zeros((4, 4), np.float32)
    _rewrite(path, tensors)
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.extra_proj"):
        hf.load(path)


def test_wrong_shape(tmp_path):
    path = _copy("deepseek_v3", tmp_path)
    tensors = _tensors(path)
    name = "model.layers.2.self_attn.kv_b_proj.weight"
    tensors[name] = tensors[name][:-1]
    _rewrite(path, tensors)
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.2\.self_attn\.kv_b_proj\.weight' has shape"):
        hf.load(path)


@pytest.mark.parametrize("field,value", [("time_step_limit", [0.0, 10.0]), ("use_bias", True),
                                         ("num_heads", 6)])
def test_unsupported_mamba2_config_value(field, value, tmp_path):
    path = _copy("mamba2", tmp_path)
    _rewrite(path, config=dict(_config("mamba2"), **{field: value}))
    with pytest.raises(ValueError, match=field):
        hf.load(path)


def test_mamba2_export_needs_transformers_norm(tmp_path):
    """Our per-group gated norm (configs/hybrid.py:arch=mamba2 with n_groups > 1) has no
    transformers Mamba2 equivalent: refused, nothing written."""
    from configs.hybrid import get_config
    cfg = get_config("tiny,arch=mamba2")
    cfg.model.ssm.n_groups = 2
    model = nnx.eval_shape(lambda: build_model(cfg.model, nnx.Rngs(0)))
    with pytest.raises(ValueError, match="model.ssm.norm_groups=None cannot be expressed in a mamba2"):
        hf.save(model, cfg, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


def test_export_rejects_what_hf_cannot_express(tmp_path):
    cfg = from_hf(_config("llama"))
    cfg.model.qk_norm = True  # Llama has no QK-norm tensors
    model = nnx.eval_shape(lambda: build_model(cfg.model, nnx.Rngs(0)))
    with pytest.raises(ValueError, match="model.qk_norm=True cannot be expressed in a llama"):
        hf.save(model, cfg, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")  # nothing written


# ------------------------------------------------------------------ FP8 checkpoints


def test_dequantize_fp8_blocks_by_hand():
    # 130 x 260 in 128 x 128 blocks: 2 x 3 scales, the last row and column blocks partial.
    rng = np.random.default_rng(0)
    w = rng.normal(size=(130, 260)).astype(ml_dtypes.float8_e4m3fn)
    scale_inv = np.array([[1.0, 2.0, 3.0], [0.5, 0.25, 4.0]], np.float32)
    want = np.empty((130, 260), np.float32)
    for i in range(130):
        for j in range(260):
            want[i, j] = float(w[i, j]) * scale_inv[i // 128, j // 128]
    np.testing.assert_array_equal(hf.dequantize_fp8_blocks(w, scale_inv, (128, 128)), want)
    with pytest.raises(ValueError, match=r"'w_scale_inv' has shape \(2, 2\), expected \(2, 3\)"):
        hf.dequantize_fp8_blocks(w, scale_inv[:, :2], (128, 128), "w")


def _quantize_blocks(w, block):
    """DeepSeek-V3's layout, written independently: E4M3 weight and per-block scale_inv."""
    rows, cols = w.shape
    nb = (-(-rows // block[0]), -(-cols // block[1]))
    scale_inv = np.zeros(nb, np.float32)
    q = np.zeros(w.shape, ml_dtypes.float8_e4m3fn)
    for i in range(nb[0]):
        for j in range(nb[1]):
            part = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]]
            s = max(float(np.abs(part).max()), 1e-12) / 448.0
            scale_inv[i, j] = s
            q[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] = (part / s).astype(
                ml_dtypes.float8_e4m3fn)
    return q, scale_inv


def test_fp8_deepseek_checkpoint_loads_as_its_dequantised_weights(tmp_path):
    block = (16, 16)
    fp8 = _copy("deepseek_v3", tmp_path / "fp8")
    plain = _copy("deepseek_v3", tmp_path / "plain")
    tensors = _tensors(fp8)
    quantised, dequantised = dict(tensors), dict(tensors)
    names = [n for n in tensors if n.endswith("proj.weight") and tensors[n].ndim == 2]
    assert len(names) > 10
    for n in names:
        q, s = _quantize_blocks(tensors[n], block)
        quantised[n], quantised[n + "_scale_inv"] = q, s
        dequantised[n] = (q.astype(np.float32) * np.kron(s, np.ones(block, np.float32))[
            :q.shape[0], :q.shape[1]])
    config = dict(_config("deepseek_v3"), quantization_config={
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
        "weight_block_size": list(block)})
    _rewrite(fp8, quantised, config)
    _rewrite(plain, dequantised)
    got, want = _params(hf.load(fp8)[0]), _params(hf.load(plain)[0])
    assert got.keys() == want.keys()
    for p in want:
        np.testing.assert_array_equal(got[p], want[p], err_msg=str(p))
    # The quantised model still computes nearly the reference logits (on average: E4M3
    # rounding flips a few tokens' expert choices, which moves those tokens' logits).
    model, _ = hf.load(fp8)
    ids = np.load(os.path.join(FIXTURES, "deepseek_v3", "input_ids.npy"))
    ref = np.load(os.path.join(FIXTURES, "deepseek_v3", "logits.npy"))
    err = np.abs(np.asarray(_forward(model, jnp.asarray(ids))) - ref)
    assert err.mean() < 0.25 * np.abs(ref).mean()  # measured 0.12; a wrong load: ~1

    # A weight without its scale, and a quantisation we cannot read, are refused by name.
    del quantised[names[0] + "_scale_inv"]
    _rewrite(fp8, quantised)
    with pytest.raises(ValueError, match=rf"tensor '{names[0]}' is FP8 but the checkpoint has no"):
        hf.load(fp8)
    config["quantization_config"]["quant_method"] = "gptq"
    _rewrite(fp8, config=config)
    with pytest.raises(ValueError, match="quantization_config=.*'gptq'"):
        hf.load(fp8)
