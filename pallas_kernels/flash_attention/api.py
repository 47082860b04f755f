"""`flash_attention`: the one public attention function, and its backend dispatch.

    o = flash_attention(q, k, v, causal=True, impl="auto")   # q, k, v: [B, T, H, D]

impl:
  "auto"        Pallas GPU kernel on GPU, Pallas TPU kernel on TPU, reference on CPU.
  "reference"   plain jnp (reference.py), differentiable by jax.
  "pallas_gpu"  Pallas kernel for NVIDIA GPUs (interpret mode on CPU).
  "pallas_tpu"  Pallas kernel for TPUs (interpret mode on CPU).
  "cudnn"/"xla" `jax.nn.dot_product_attention` with that implementation (comparisons).
  "ring"        ring attention over the sequence mesh axis (context parallelism); the
                backend registers itself when `sharding.sequence` is imported.

A backend is a function with the signature of `flash_attention` minus `impl`; it raises
`NotImplementedError` for a feature it lacks, and "auto" then falls back to the reference;
a backend asked for by name turns it into a ValueError naming the impl, the feature and
the impls that have it. `DPA_LACKS` lists what "cudnn"/"xla" lack, so that configs can be
refused before compute (`impl_lacks`): jax.nn.dot_product_attention has no segment ids
(train.py's packed batches always carry them), soft-cap, sinks or explicit positions.

Attention dropout (`dropout_rate > 0` with a `dropout_seed`; dropout.py) is implemented by
the impls in `DROPOUT_IMPLS`; the others raise a ValueError. Only those backends ever see
the two arguments, and only when the rate is above 0. "auto" with dropout runs the Triton
kernel on GPU (never the Hopper Mosaic kernels), the Pallas TPU kernel on TPU and the
reference on CPU.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention import reference
from pallas_kernels.flash_attention.dropout import check_dropout

IMPLS = ("auto", "reference", "pallas_gpu", "pallas_tpu", "cudnn", "xla", "ring")
DROPOUT_IMPLS = ("auto", "reference", "pallas_gpu", "pallas_tpu")  # with attention dropout
_SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Features jax.nn.dot_product_attention (impls "cudnn" and "xla") cannot take.
DPA_LACKS = ("segment_ids", "logit_soft_cap", "sinks", "positions", "q_len != kv_len")
FULL_FEATURE_IMPLS = ("auto", "pallas_gpu", "pallas_tpu", "reference")  # take every feature


def impl_lacks(impl: str, features) -> list[str]:
    """The `features` (names of DPA_LACKS) that attention `impl` cannot serve."""
    return [f for f in features if f in DPA_LACKS] if impl in ("cudnn", "xla") else []

_BACKENDS: dict[str, Callable] = {}


def register_backend(name: str, fn: Callable) -> None:
    if name not in IMPLS:
        raise ValueError(f"backend {name=} must be one of {IMPLS}")
    _BACKENDS[name] = fn


def _reference_backend(q, k, v, *, block_sizes=None, **kw):
    del block_sizes
    return reference.mha_reference(q, k, v, **kw)


def _dot_product_attention_backend(implementation):
    def run(q, k, v, *, causal, sliding_window, segment_ids, q_positions, kv_positions,
            logit_soft_cap, sm_scale, sinks, block_sizes=None):
        del block_sizes
        used = {"segment_ids": segment_ids is not None, "logit_soft_cap": logit_soft_cap is not None,
                "sinks": sinks is not None, "positions": q_positions is not None,
                "q_len != kv_len": q.shape[1] != k.shape[1]}
        lacking = impl_lacks(implementation, [f for f, on in used.items() if on])
        if lacking:
            raise NotImplementedError(f"jax.nn.dot_product_attention has no {lacking}")
        window = None if sliding_window is None else (
            (sliding_window - 1, 0) if causal else (sliding_window - 1, sliding_window - 1))
        return jax.nn.dot_product_attention(
            q, k, v, scale=sm_scale, is_causal=causal, local_window_size=window,
            implementation=implementation)
    return run


register_backend("reference", _reference_backend)
register_backend("xla", _dot_product_attention_backend("xla"))
register_backend("cudnn", _dot_product_attention_backend("cudnn"))


def validate_inputs(q, k, v, segment_ids, q_positions, kv_positions, sliding_window, sinks, impl):
    """ValueError naming the argument for anything a backend cannot take (shared by backends)."""
    if impl not in IMPLS:
        raise ValueError(f"{impl=} must be one of {IMPLS}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must have rank 4 [batch, seq, heads, head_dim], got {x.shape=}")
        if x.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"{name}.dtype={x.dtype} must be one of float32, bfloat16, float16")
    b, tq, h, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch sizes differ: {q.shape=}, {k.shape=}, {v.shape=}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must agree on [batch, seq, kv_heads]: {k.shape=}, {v.shape=}")
    if k.shape[3] != d:
        raise ValueError(f"q and k head dims differ: {q.shape=}, {k.shape=}")
    hkv = k.shape[2]
    if h % hkv:
        raise ValueError(f"query heads {h} must be divisible by kv heads {hkv}")
    tk = k.shape[1]
    q_seg, kv_seg = reference.split_segment_ids(segment_ids, tq, tk)
    if q_seg is not None:
        if q_seg.shape != (b, tq) or kv_seg.shape != (b, tk):
            raise ValueError(
                f"segment_ids must be [batch, seq] for q {(b, tq)} and kv {(b, tk)}; got "
                f"{q_seg.shape} and {kv_seg.shape} (pass a (q_seg, kv_seg) pair when q_len != kv_len)")
    if (q_positions is None) != (kv_positions is None):
        raise ValueError("q_positions and kv_positions must be given together")
    if q_positions is not None and (q_positions.shape != (b, tq) or kv_positions.shape != (b, tk)):
        raise ValueError(f"positions must be [batch, seq]: {q_positions.shape=}, {kv_positions.shape=}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"{sliding_window=} must be a positive int or None")
    if sinks is not None and sinks.shape != (h,):
        raise ValueError(f"sinks must have shape [heads]=({h},), got {sinks.shape}")


def flash_attention(
    q,
    k,
    v,
    *,
    causal: bool = False,
    sliding_window: int | None = None,
    segment_ids=None,
    q_positions=None,
    kv_positions=None,
    logit_soft_cap: float | None = None,
    sm_scale: float | None = None,
    sinks=None,
    dropout_rate: float = 0.0,
    dropout_seed=None,
    impl: str = "auto",
    block_sizes=None,
):
    """Attention over BTHD arrays; see reference.py for the exact mask semantics.

    `dropout_rate` > 0 drops attention probabilities (scaling the kept by 1 / (1 - rate))
    with the mask of dropout.keep_mask for `dropout_seed` (a Python int or an int32/uint32
    scalar array, may be traced); only the impls in DROPOUT_IMPLS take it.
    """
    validate_inputs(q, k, v, segment_ids, q_positions, kv_positions, sliding_window, sinks, impl)
    dropout_rate = check_dropout(dropout_rate, dropout_seed)
    if dropout_rate > 0 and impl not in DROPOUT_IMPLS:
        raise ValueError(f"attention {impl=} has no attention dropout ({dropout_rate=}); "
                         f"impls with attention dropout: {DROPOUT_IMPLS}")
    kw = dict(causal=causal, sliding_window=sliding_window, segment_ids=segment_ids,
              q_positions=q_positions, kv_positions=kv_positions,
              logit_soft_cap=logit_soft_cap, sm_scale=sm_scale, sinks=sinks)
    if dropout_rate > 0:  # only then: backends without dropout never see the arguments
        kw.update(dropout_rate=dropout_rate, dropout_seed=dropout_seed)
    if impl == "auto":
        platform = jax.default_backend()
        impl = {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "tpu": "pallas_tpu"}.get(platform, "reference")
        if impl != "reference":
            if impl in _BACKENDS:
                try:
                    return _BACKENDS[impl](q, k, v, block_sizes=block_sizes, **kw)
                except NotImplementedError:
                    pass
        return _reference_backend(q, k, v, **kw)
    if impl not in _BACKENDS:
        raise ValueError(f"attention {impl=} is not available in this build; have {sorted(_BACKENDS)}")
    try:
        return _BACKENDS[impl](q, k, v, block_sizes=block_sizes, **kw)
    except NotImplementedError as e:
        raise ValueError(f"attention {impl=} cannot serve this call ({e}); impls with every "
                         f"feature: {FULL_FEATURE_IMPLS}") from e
