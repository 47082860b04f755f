"""`paged_attention`: decode attention over a paged KV cache, and its backend dispatch.

    o = paged_attention(q, k_pages, v_pages, lengths, page_table, impl="auto")
    # q [B, H, D]; k_pages, v_pages [kv_heads, num_pages, page_size, D];
    # lengths [B] int32; page_table [B, max_pages] int32  ->  o [B, H, D]

impl:
  "auto"        Pallas GPU kernel on GPU, Pallas TPU kernel on TPU, reference on CPU;
                falls back to the reference for inputs a kernel cannot tile.
  "reference"   plain jnp (reference.py): gathers the pages, then masked softmax.
  "pallas_gpu"  Pallas/Triton split-K kernel (gpu.py); interpret mode on CPU.
  "pallas_tpu"  Pallas TPU kernel with scalar-prefetched page table (tpu.py);
                interpret mode on CPU.

A backend is a function `(q, k_pages, v_pages, lengths, page_table, *, sm_scale,
logit_soft_cap, sliding_window, block_sizes)`; it raises NotImplementedError for an
input it cannot handle. Decode only: no gradients through the kernels.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.paged_attention import reference

IMPLS = ("auto", "reference", "pallas_gpu", "pallas_tpu")
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)

_BACKENDS: dict[str, Callable] = {}


def register_backend(name: str, fn: Callable) -> None:
    if name not in IMPLS or name == "auto":
        raise ValueError(f"backend {name=} must be one of {IMPLS[1:]}")
    _BACKENDS[name] = fn


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def _reference_backend(q, k_pages, v_pages, lengths, page_table, *, block_sizes=None, **kw):
    del block_sizes
    return reference.paged_attention_reference(q, k_pages, v_pages, lengths, page_table, **kw)


def _gpu_backend(q, k_pages, v_pages, lengths, page_table, **kw):
    from pallas_kernels.paged_attention import gpu

    return gpu.paged_attention_gpu(q, k_pages, v_pages, lengths, page_table,
                                   interpret=_on_cpu(), **kw)


def _tpu_backend(q, k_pages, v_pages, lengths, page_table, *, return_lse=False, **kw):
    from jax.experimental.pallas import tpu as pltpu

    from pallas_kernels.paged_attention import tpu

    if return_lse:
        raise NotImplementedError("the TPU kernel does not return the log-sum-exp")

    interpret = pltpu.InterpretParams() if _on_cpu() else False
    return tpu.paged_attention_tpu(q, k_pages, v_pages, lengths, page_table,
                                   interpret=interpret, **kw)


# Backends that return the log-sum-exp (`return_lse=True`), which cascade.py merges by.
LSE_IMPLS = ("reference", "pallas_gpu")


def _platform_impl() -> str:
    """The backend "auto" picks on this platform."""
    platform = jax.default_backend()
    return {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "tpu": "pallas_tpu"}.get(platform, "reference")


def returns_lse(impl: str) -> bool:
    """True if `impl` ("auto" resolved for this platform) returns the log-sum-exp with
    its own kernel; elsewhere `return_lse=True` would fall back to the reference."""
    return (_platform_impl() if impl == "auto" else impl) in LSE_IMPLS


register_backend("reference", _reference_backend)
register_backend("pallas_gpu", _gpu_backend)
register_backend("pallas_tpu", _tpu_backend)


def _concrete(x):
    """x as a numpy array, or None while tracing."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _validate(q, k_pages, v_pages, lengths, page_table, sm_scale, logit_soft_cap,
              sliding_window, impl):
    if impl not in IMPLS:
        raise ValueError(f"{impl=} must be one of {IMPLS}")
    if q.ndim != 3:
        raise ValueError(f"q must have rank 3 [batch, heads, head_dim], got {q.shape=}")
    for name, x in (("k_pages", k_pages), ("v_pages", v_pages)):
        if x.ndim != 4:
            raise ValueError(
                f"{name} must have rank 4 [kv_heads, num_pages, page_size, head_dim], got {x.shape}")
    for name, x in (("q", q), ("k_pages", k_pages), ("v_pages", v_pages)):
        if x.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name}.dtype={x.dtype} must be one of float32, bfloat16, float16")
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages and v_pages must have one shape: {k_pages.shape=}, {v_pages.shape=}")
    if k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k_pages and v_pages must have one dtype: {k_pages.dtype=}, {v_pages.dtype=}")
    b, h, d = q.shape
    hkv, _, _, dk = k_pages.shape
    if dk != d:
        raise ValueError(f"head_dim of q ({d}) and k_pages ({dk}) differ: {q.shape=}, {k_pages.shape=}")
    if h % hkv:
        raise ValueError(f"query heads {h} must be divisible by kv_heads {hkv} ({q.shape=}, {k_pages.shape=})")
    for name, x, shape in (("lengths", lengths, (b,)), ("page_table", page_table, (b, None))):
        if x.ndim != len(shape) or x.shape[0] != b:
            raise ValueError(f"{name} must have shape {shape} with batch {b}, got {x.shape}")
        if x.dtype != jnp.int32:
            raise ValueError(f"{name}.dtype={x.dtype} must be int32")
    if page_table.shape[1] < 1:
        raise ValueError(f"page_table must have at least one column, got {page_table.shape=}")
    if sm_scale is not None and not sm_scale > 0:
        raise ValueError(f"{sm_scale=} must be a positive float or None")
    if logit_soft_cap is not None and not logit_soft_cap > 0:
        raise ValueError(f"{logit_soft_cap=} must be a positive float or None")
    if sliding_window is not None and (int(sliding_window) != sliding_window or sliding_window < 1):
        raise ValueError(f"{sliding_window=} must be a positive int or None")
    lens = _concrete(lengths)
    if lens is not None:
        capacity = page_table.shape[1] * k_pages.shape[2]
        if lens.size and (lens.min() < 0 or lens.max() > capacity):
            raise ValueError(
                f"lengths must lie in [0, max_pages * page_size = {capacity}], got {lens.tolist()}")


def paged_attention(
    q,
    k_pages,
    v_pages,
    lengths,
    page_table,
    *,
    sm_scale: float | None = None,
    logit_soft_cap: float | None = None,
    sliding_window: int | None = None,
    impl: str = "auto",
    block_sizes=None,
    return_lse: bool = False,
):
    """Decode attention of one query per sequence over its paged keys and values.

    Args:
      q: [B, H, D] queries (the newest token of each sequence).
      k_pages, v_pages: [kv_heads, num_pages, page_size, D] page pools; H % kv_heads == 0.
      lengths: [B] int32 number of keys of each sequence (0 gives a zero output).
      page_table: [B, max_pages] int32; token t of sequence b is at page
        `page_table[b, t // page_size]`, slot `t % page_size`. Entries past a
        sequence's last page may hold any value.
      sm_scale: logit scale, default 1/sqrt(D).
      logit_soft_cap: if set, logits become `cap * tanh(s / cap)`.
      sliding_window: if set, only the last `sliding_window` keys are attended.
      impl: one of IMPLS (see the module docstring).
      block_sizes: the chosen backend's BlockSizes (gpu.BlockSizes / tpu.BlockSizes).

      return_lse: also return the log-sum-exp of each row's logits ([B, H] f32, -inf
        for a row with no keys), to merge attention over disjoint key sets (cascade.py).

    Returns:
      [B, H, D] attention output in q's dtype; with `return_lse`, the output in f32
      (a partial result to merge: no rounding before the merge) and the log-sum-exp.
    """
    _validate(q, k_pages, v_pages, lengths, page_table, sm_scale, logit_soft_cap,
              sliding_window, impl)
    kw = dict(sm_scale=sm_scale, logit_soft_cap=logit_soft_cap, sliding_window=sliding_window,
              return_lse=return_lse)
    if impl == "auto":
        impl = _platform_impl()
        try:
            return _BACKENDS[impl](q, k_pages, v_pages, lengths, page_table,
                                   block_sizes=block_sizes, **kw)
        except NotImplementedError:
            return _reference_backend(q, k_pages, v_pages, lengths, page_table, **kw)
    try:
        return _BACKENDS[impl](q, k_pages, v_pages, lengths, page_table,
                               block_sizes=block_sizes, **kw)
    except NotImplementedError as e:
        raise ValueError(f"{impl=} cannot run this input: {e}") from e
