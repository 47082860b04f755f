"""`ssd`: Mamba-2's state space layer (SSD), argument checks and backend dispatch.

    y = ssd(x, dt, A, B, C, D=D, chunk_size=64, segment_ids=seg)          # training
    y, state = ssd(x, dt, A, B, C, initial_state=s, return_final_state=True)  # prefill

Shapes: x [B, T, H, P], dt [B, T, H] (positive: softplus(dt + dt_bias) is the layer's
job), A [H] (negative: -exp(A_log)), B and C [B, T, G, N] with G dividing H (heads
h*H/G .. (h+1)*H/G - 1 share group h's B and C, as GQA's query heads share a K/V head),
D [H], segment_ids [B, T] (the state is reset where the segment changes), initial_state
and the final state [B, H, P, N] in f32. Semantics: reference.ssd_recurrence.

impl:
  "auto"        the platform's kernel where it was timed faster (KERNELS_IN_AUTO: GPUs
                only), else "chunked" (CPU, and TPU until its kernel runs on one); a
                kernel that cannot take the call (NotImplementedError) falls back to
                "chunked".
  "reference"   reference.ssd_recurrence: a lax.scan over tokens (the definition; slow).
  "chunked"     reference.ssd_chunked: the chunked SSD in plain jnp (f32).
  "pallas_gpu"  gpu.py: Mamba-2's three Triton kernels (chunk states, state passing,
                chunk scan) in Pallas; interpret mode off a GPU.
  "pallas_tpu"  tpu.py: one Pallas TPU kernel with a sequential chunk axis; interpret
                mode off a TPU.

Gradients: "reference" and "chunked" are differentiated by jax. The Pallas impls run
their kernel forward under a `jax.custom_vjp`. Its backward is the backend's kernel
backward where one is registered (`register_backward`: gpu_bwd.py for "pallas_gpu",
tpu_bwd.py for "pallas_tpu"), else the autodiff of the chunked jnp form
(`jax.vjp(reference.ssd_chunked)`, recomputed from the inputs: the backward of last
resort of DESIGN.md).
`segment_ids` get no cotangent.

A backend is `forward(x, dt, A, B, C, D, segment_ids, initial_state, *, chunk_size,
block_sizes, interpret) -> (y, final_state)`, registered with `register_backend`; it
raises NotImplementedError for a call it cannot take (a chunk size its tiles cannot hold).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from pallas_kernels.ssd import reference

IMPLS = ("auto", "reference", "chunked", "pallas_gpu", "pallas_tpu")
# The platforms whose kernel "auto" picks. The GPU kernels run compiled on an H200
# (`JAX_PLATFORMS=cuda,cpu pytest tests/pallas_kernels/test_ssd.py`: values and gradients
# match). Timed there (bench/results/ssd.md), forward+backward with the kernel backward is
# 2.1-2.5x the chunked jnp form, and a 1B hybrid's train step 1.19x faster. The TPU
# kernels (forward and backward) never ran on a TPU, so TPUs run "chunked".
KERNELS_IN_AUTO = ("gpu",)
PALLAS_IMPLS = ("pallas_gpu", "pallas_tpu")
_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)

_BACKENDS: dict[str, Callable] = {}
_BACKWARDS: dict[str, Callable] = {}


def register_backend(name: str, forward: Callable) -> None:
    if name not in PALLAS_IMPLS:
        raise ValueError(f"backend {name=} must be one of {PALLAS_IMPLS}")
    _BACKENDS[name] = forward


def register_backward(name: str, backward: Callable) -> None:
    """A backend's kernel backward; a backend without one is differentiated through the
    chunked jnp form."""
    if name not in PALLAS_IMPLS:
        raise ValueError(f"backward {name=} must be one of {PALLAS_IMPLS}")
    _BACKWARDS[name] = backward


def resolve_impl(impl: str) -> str:
    """The impl that runs: "auto" becomes the platform's kernel (KERNELS_IN_AUTO), else "chunked"."""
    if impl not in IMPLS:
        raise ValueError(f"ssd {impl=} must be one of {IMPLS}")
    if impl != "auto":
        return impl
    platform = {"cuda": "gpu", "rocm": "gpu"}.get(jax.default_backend(), jax.default_backend())
    if platform not in KERNELS_IN_AUTO:
        return "chunked"
    return {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(platform, "chunked")


# ----------------------------------------------------------------------------- checks
def validate_inputs(x, dt, A, B, C, D, segment_ids, initial_state, chunk_size) -> None:
    """ValueError naming the argument for anything a backend cannot take."""
    if x.ndim != 4:
        raise ValueError(f"x must be [batch, seq, heads, head_dim], got {x.shape=}")
    b, t, h, p = x.shape
    if dt.shape != (b, t, h):
        raise ValueError(f"dt must be [batch, seq, heads]={(b, t, h)}, got {dt.shape=}")
    if A.shape != (h,):
        raise ValueError(f"A must be [heads]=({h},), got {A.shape=}")
    if B.ndim != 4 or B.shape[:2] != (b, t):
        raise ValueError(f"B must be [batch, seq, groups, d_state] with batch, seq {(b, t)}, "
                         f"got {B.shape=}")
    if C.shape != B.shape:
        raise ValueError(f"C must have B's shape {B.shape}, got {C.shape=}")
    g, n = B.shape[2:]
    if h % g:
        raise ValueError(f"heads={h} (x.shape[2]) must be divisible by groups={g} (B.shape[2])")
    if D is not None and D.shape != (h,):
        raise ValueError(f"D must be None or [heads]=({h},), got {D.shape=}")
    if segment_ids is not None:
        if segment_ids.shape != (b, t):
            raise ValueError(f"segment_ids must be [batch, seq]={(b, t)}, got {segment_ids.shape}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids.dtype={segment_ids.dtype} must be an integer dtype")
    if initial_state is not None and initial_state.shape != (b, h, p, n):
        raise ValueError(f"initial_state must be [batch, heads, head_dim, d_state]={(b, h, p, n)}, "
                         f"got {initial_state.shape}")
    for name, a in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
        if a.dtype not in _FLOATS:
            raise ValueError(f"{name}.dtype={a.dtype} must be one of float32, bfloat16, float16")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{chunk_size=} must be a positive int")


# ----------------------------------------------------------------------------- custom_vjp
@dataclasses.dataclass(frozen=True)
class _Static:
    impl: str
    chunk_size: int
    block_sizes: Any
    interpret: Any


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ssd_kernel(static: _Static, x, dt, A, B, C, D, segment_ids, initial_state):
    return _BACKENDS[static.impl](x, dt, A, B, C, D, segment_ids, initial_state,
                                  chunk_size=static.chunk_size, block_sizes=static.block_sizes,
                                  interpret=static.interpret)


def _ssd_kernel_fwd(static, x, dt, A, B, C, D, segment_ids, initial_state):
    out = _ssd_kernel(static, x, dt, A, B, C, D, segment_ids, initial_state)
    return out, (x, dt, A, B, C, D, segment_ids, initial_state)


def _ssd_kernel_bwd(static, res, cotangents):
    """The backend's kernel backward, or the backward of last resort: autodiff of the
    chunked jnp form, recomputed."""
    x, dt, A, B, C, D, segment_ids, initial_state = res
    dy, dstate = cotangents
    if static.impl in _BACKWARDS:
        dx, ddt, dA, dB, dC, dD, dinit = _BACKWARDS[static.impl](
            x, dt, A, B, C, D, segment_ids, initial_state, dy, dstate,
            chunk_size=static.chunk_size, block_sizes=static.block_sizes,
            interpret=static.interpret)
        return dx, ddt, dA, dB, dC, dD, None, dinit

    def chunked(x, dt, A, B, C, D, initial_state):
        return reference.ssd_chunked(x, dt, A, B, C, chunk_size=static.chunk_size, D=D,
                                     segment_ids=segment_ids, initial_state=initial_state)

    _, vjp = jax.vjp(chunked, x, dt, A, B, C, D, initial_state)
    dx, ddt, dA, dB, dC, dD, dinit = vjp((dy.astype(x.dtype), dstate.astype(jnp.float32)))
    return dx, ddt, dA, dB, dC, dD, None, dinit


_ssd_kernel.defvjp(_ssd_kernel_fwd, _ssd_kernel_bwd)


# ----------------------------------------------------------------------------- public API
def ssd(x, dt, A, B, C, *, chunk_size: int = 64, D=None, segment_ids=None, initial_state=None,
        return_final_state: bool = False, impl: str = "auto", block_sizes=None, interpret=None):
    """Mamba-2's SSD over [B, T, H, P] inputs (see the module docstring for shapes).

    Args:
      chunk_size: tokens per chunk of the chunked impls (changes rounding, not results);
        the Pallas GPU kernel needs a power of two >= 16, the TPU kernel a multiple of 8
        (of 128 compiled on a TPU).
      segment_ids: [B, T] ints; the recurrence restarts where they change (packed
        documents; padding is just one more segment).
      initial_state: [B, H, P, N] state before token 0 (decoding), default zeros.
      return_final_state: also return the state after the last token ([B, H, P, N] f32).
      impl: see the module docstring.
      block_sizes: the Pallas backend's tile class (gpu.BlockSizes / tpu.BlockSizes).
      interpret: Pallas interpret mode; None: on when the backend's device is absent.

    Returns:
      y [B, T, H, P] in x's dtype, and the final state when `return_final_state`.
    """
    validate_inputs(x, dt, A, B, C, D, segment_ids, initial_state, chunk_size)
    requested, impl = impl, resolve_impl(impl)
    kw = dict(D=D, segment_ids=segment_ids, initial_state=initial_state)
    if impl in PALLAS_IMPLS:
        if impl not in _BACKENDS:
            if requested == "auto":
                impl = "chunked"
            else:
                raise ValueError(f"ssd {impl=} is not available in this jax build; have "
                                 f"{sorted(_BACKENDS)}")
    if impl in PALLAS_IMPLS:
        static = _Static(impl, chunk_size, block_sizes, interpret)
        try:
            out = _ssd_kernel(static, x, dt, A, B, C, D, segment_ids, initial_state)
        except NotImplementedError as e:
            if requested != "auto":
                raise ValueError(f"ssd {impl=} cannot take this call ({e}); impl='chunked' "
                                 "takes every call") from e
            impl = "chunked"
        else:
            return out if return_final_state else out[0]
    if impl == "reference":
        out = reference.ssd_recurrence(x, dt, A, B, C, **kw)
    else:
        out = reference.ssd_chunked(x, dt, A, B, C, chunk_size=chunk_size, **kw)
    return out if return_final_state else out[0]
