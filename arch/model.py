"""Model stacks: decoder-only LM, encoder-only (BERT-style) and encoder-decoder (T5-style).

    model = build_model(cfg.model, nnx.Rngs(params=0))
    logits, aux = model(tokens)                      # tokens [B, T] -> logits [B, T, V] f32

Every call takes `positions [B, T]` (default arange; RoPE and learned positions use
them) and `segment_ids [B, T]` (packed documents, 0 = padding; attention never crosses
segments). `aux` holds what training needs besides logits:
  moe_aux_loss, moe_z_loss  summed over layers (0 without MoE)
  max_logits                [layers, heads] per-head max attention logit (cfg.track_max_logits)
  layers                    per-layer aux: a list of dicts (a dict of stacked arrays when scanned)
  cache                     the updated KV cache, when a `cache` was given

Decoding: `cache` is a tuple of per-layer caches (serving/cache.py `init_cache`); the
new tokens' keys/values are written to it and attention runs over everything cached.
Positions then default to each row's cache length + arange (list layers only).

Layers run as a Python list by default, or with `nnx.scan` over identical layers
(`scan_layers=True`: compiles one layer, parameters stacked on a leading "layers" axis).
`remat` trades compute for memory: none | full | dots_saveable.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections as mlc
from flax import nnx

from arch.attention import layer_kind
from arch.block import Block, is_moe_layer
from arch.common import Linear, check_choice, dtype_of, logical_param
from arch.dropout import check_dropout_config, make_dropout, residual_rate
from arch.norms import make_norm
from arch.positional import LearnedPositions, SinusoidalPositions
from arch.precision import MATMUL_PRECISIONS, check_expert_precision

KINDS = ("decoder", "encoder", "encoder_decoder")
REMAT = ("none", "full", "dots_saveable")
_REMAT_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def validate_model_config(cfg) -> None:
    check_choice("model.kind", cfg.kind, KINDS)
    check_choice("model.remat", cfg.remat, REMAT)
    check_choice("model.matmul_precision", cfg.get("matmul_precision", "bf16"), MATMUL_PRECISIONS)
    if cfg.get("moe") is not None:
        check_expert_precision(cfg.get("matmul_precision", "bf16"))
    check_dropout_config(cfg)
    for field in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "max_seq_len"):
        value = cfg[field]
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"model.{field}={value!r} must be a positive int")
    if cfg.kind == "encoder_decoder" and cfg.num_encoder_layers < 1:
        raise ValueError(f"model.num_encoder_layers={cfg.num_encoder_layers} must be >= 1 for an encoder_decoder")
    if cfg.scan_layers:
        kinds = {(layer_kind(cfg, i), is_moe_layer(cfg, i)) for i in range(cfg.num_layers)}
        if len(kinds) > 1:
            raise ValueError(
                "model.scan_layers=True needs identical layers, but layer_pattern / moe give "
                f"{sorted(kinds)}; use scan_layers=False")


class Embedding(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs, std: float = 0.02):
        self.embedding = logical_param(jax.random.normal(rngs.params(), (vocab, dim)) * std, ("vocab", "embed"))

    def __call__(self, tokens):
        return jnp.take(self.embedding[...], tokens, axis=0)

    def attend(self, x):
        """Tied output head: logits = x @ E^T."""
        return jnp.einsum("btd,vd->btv", x, self.embedding[...].astype(x.dtype))


class LayerStack(nnx.Module):
    """num_layers Blocks, as a list or scanned; returns (x, per-layer aux)."""

    def __init__(self, cfg, num_layers: int, *, rngs: nnx.Rngs, cross_attention: bool = False):
        self.scan = cfg.scan_layers
        self.remat = cfg.remat
        if self.scan:
            @nnx.split_rngs(splits=num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make(r):
                return Block(cfg, rngs=r, layer_idx=0, cross_attention=cross_attention)

            self.layers = make(rngs)
        else:
            self.layers = nnx.List([Block(cfg, rngs=rngs, layer_idx=i, cross_attention=cross_attention)
                                    for i in range(num_layers)])

    def __call__(self, x, cache=None, **kw):
        """`cache`: None or one per-layer cache per block (serving/cache.py); each block's
        updated cache comes back in its aux as "cache"."""
        if cache is not None:
            if self.scan:
                raise ValueError("a KV cache needs model.scan_layers=False: scanned layers "
                                 "would need a stacked cache")
            if len(cache) != len(self.layers):
                raise ValueError(f"cache holds {len(cache)} layers; the model has {len(self.layers)}")

        def run(block, h, layer_cache=None):
            return block(h, cache=layer_cache, **kw)

        if self.remat != "none":
            run = nnx.remat(run, policy=_REMAT_POLICIES[self.remat])
        if self.scan:
            @nnx.scan(in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0),
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
            def step(block, h):
                h, aux = run(block, h)
                return h, aux

            return step(self.layers, x)
        auxes = []
        for i, block in enumerate(self.layers):
            x, aux = run(block, x, None if cache is None else cache[i])
            auxes.append(aux)
        return x, auxes


def summarize_aux(layer_aux, scanned: bool) -> dict:
    """Totals of the per-layer aux that training reads, plus the per-layer detail."""
    out = {"layers": layer_aux, "moe_aux_loss": jnp.float32(0), "moe_z_loss": jnp.float32(0)}
    if scanned:
        for name in ("moe_aux_loss", "moe_z_loss"):
            if name in layer_aux:
                out[name] = jnp.sum(layer_aux[name])
        if "max_logits" in layer_aux:
            out["max_logits"] = layer_aux["max_logits"]
        return out
    for a in layer_aux:
        for name in ("moe_aux_loss", "moe_z_loss"):
            if name in a:
                out[name] = out[name] + a[name]
    if layer_aux and all("max_logits" in a for a in layer_aux):
        out["max_logits"] = jnp.stack([a["max_logits"] for a in layer_aux])
    return out


def _positions_embedding(cfg, rngs):
    if cfg.position_embedding == "learned":
        return LearnedPositions(cfg.max_seq_len, cfg.d_model, rngs=rngs, std=cfg.init_std)
    if cfg.position_embedding == "sinusoidal":
        return SinusoidalPositions(cfg.max_seq_len, cfg.d_model)
    return None


def _check_inputs(cfg, tokens, positions, segment_ids):
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, seq], got {tokens.shape=}")
    b, t = tokens.shape
    if t > cfg.max_seq_len:
        raise ValueError(f"sequence length {t} exceeds model.max_seq_len={cfg.max_seq_len}")
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if positions.shape != (b, t):
        raise ValueError(f"positions must be {(b, t)}, got {positions.shape}")
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids must be {(b, t)}, got {segment_ids.shape}")
    return positions


class Transformer(nnx.Module):
    """Decoder-only LM (causal) or encoder-only model (cfg.causal=False), with an LM head."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        validate_model_config(cfg)
        self.cfg = cfg
        self.dtype = dtype_of(cfg.dtype)
        self.embed = Embedding(cfg.vocab_size, cfg.d_model, rngs=rngs, std=cfg.init_std)
        self.pos_embed = _positions_embedding(cfg, rngs)
        self.embed_dropout = make_dropout(residual_rate(cfg), rngs)  # GPT-2's embd_pdrop
        self.stack = LayerStack(cfg, cfg.num_layers, rngs=rngs)
        self.final_norm = make_norm(cfg) if cfg.final_norm else None
        self.lm_head = None if cfg.tie_embeddings else Linear(
            cfg.d_model, cfg.vocab_size, in_axes=("embed",), out_axes=("vocab",), rngs=rngs,
            std=cfg.init_std, dtype=self.dtype, param_dtype=dtype_of(cfg.param_dtype))

    def embed_tokens(self, tokens, positions):
        x = self.embed(tokens).astype(self.dtype)  # [B, T, D]
        if self.cfg.embed_scale:  # Gemma: the normaliser is rounded to the compute dtype
            x = x * jnp.asarray(math.sqrt(self.cfg.d_model), self.dtype)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions).astype(self.dtype)
        return x if self.embed_dropout is None else self.embed_dropout(x)

    def head(self, x):
        if self.final_norm is not None:
            x = self.final_norm(x)
        logits = self.embed.attend(x) if self.lm_head is None else self.lm_head(x)
        logits = logits.astype(jnp.float32)  # [B, T, V]
        cap = self.cfg.final_logit_soft_cap
        if cap is not None:
            logits = cap * jnp.tanh(logits / cap)
        return logits

    def __call__(self, tokens, positions=None, segment_ids=None, cache=None):
        if cache is not None and positions is None:  # continue each row where its cache ends
            positions = cache[0].lengths[:, None] + jnp.arange(tokens.shape[-1], dtype=jnp.int32)
        positions = _check_inputs(self.cfg, tokens, positions, segment_ids)
        x = self.embed_tokens(tokens, positions)
        x, layer_aux = self.stack(x, positions=positions, segment_ids=segment_ids, cache=cache)
        new_cache = None if cache is None else tuple(a.pop("cache") for a in layer_aux)
        aux = summarize_aux(layer_aux, self.cfg.scan_layers)
        if new_cache is not None:
            aux["cache"] = new_cache
        return self.head(x), aux


class EncoderDecoder(nnx.Module):
    """T5-style: a bidirectional encoder, a causal decoder with cross-attention, shared embeddings."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        validate_model_config(cfg)
        self.cfg = cfg
        enc_cfg = mlc.FrozenConfigDict({**cfg.to_dict(), "causal": False})
        self.decoder = Transformer(cfg, rngs=rngs)  # owns the shared embedding and the head
        self.encoder = LayerStack(enc_cfg, cfg.num_encoder_layers, rngs=rngs)
        self.encoder_norm = make_norm(cfg) if cfg.final_norm else None
        # Decoder layers with cross-attention replace the plain decoder stack.
        self.decoder.stack = LayerStack(cfg, cfg.num_layers, rngs=rngs, cross_attention=True)

    def encode(self, tokens, positions=None, segment_ids=None):
        positions = _check_inputs(self.cfg, tokens, positions, segment_ids)
        x = self.decoder.embed_tokens(tokens, positions)
        x, _ = self.encoder(x, positions=positions, segment_ids=segment_ids)
        return x if self.encoder_norm is None else self.encoder_norm(x)

    def __call__(self, tokens, positions=None, segment_ids=None, cache=None, *,
                 encoder_tokens, encoder_positions=None, encoder_segment_ids=None):
        enc = self.encode(encoder_tokens, encoder_positions, encoder_segment_ids)
        positions = _check_inputs(self.cfg, tokens, positions, segment_ids)
        x = self.decoder.embed_tokens(tokens, positions)
        if (segment_ids is None) != (encoder_segment_ids is None):
            raise ValueError("segment_ids and encoder_segment_ids must be given together")
        x, layer_aux = self.decoder.stack(
            x, positions=positions, segment_ids=segment_ids, cache=cache,
            encoder_out=enc, encoder_segment_ids=encoder_segment_ids)
        new_cache = None if cache is None else tuple(a.pop("cache") for a in layer_aux)
        aux = summarize_aux(layer_aux, self.cfg.scan_layers)
        if new_cache is not None:
            aux["cache"] = new_cache
        return self.decoder.head(x), aux


def freeze(cfg) -> mlc.FrozenConfigDict:
    """Modules keep their config; a frozen one is hashable, as jit's static data must be."""
    return cfg if isinstance(cfg, mlc.FrozenConfigDict) else mlc.FrozenConfigDict(cfg)


def build_model(cfg, rngs: nnx.Rngs | int = 0) -> nnx.Module:
    """Build any family from its model config (cfg.model of a family config)."""
    cfg = freeze(cfg)
    if isinstance(rngs, int):
        rngs = nnx.Rngs(params=rngs, dropout=rngs + 1)
    if cfg.kind == "encoder_decoder":
        return EncoderDecoder(cfg, rngs=rngs)
    return Transformer(cfg, rngs=rngs)


def _is_routed_expert(var) -> bool:
    axes = tuple(getattr(var, "out_sharding", None) or ())
    return bool(axes) and (axes[0] == "expert" or axes[:2] == ("layers", "expert"))


def count_params(cfg) -> tuple[int, int]:
    """(total, active per token) from abstract shapes: nothing is allocated.

    Active counts every parameter a token touches: routed experts contribute top_k of
    num_experts. A tied embedding/head is one table, counted once.
    """
    cfg = freeze(cfg)
    model = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))
    total = inactive = 0
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            size = math.prod(var.shape)
            total += size
            if cfg.moe is not None and _is_routed_expert(var):
                inactive += size * (1 - cfg.moe.top_k / cfg.moe.num_experts)
    return int(total), int(round(total - inactive))
