"""Flax NNX modules for every LLM component, and model assembly.

    from arch import build_model, count_params
    model = build_model(cfg.model, nnx.Rngs(params=0))
"""
from arch.model import EncoderDecoder, Transformer, build_model, count_params

__all__ = ["build_model", "count_params", "Transformer", "EncoderDecoder"]
