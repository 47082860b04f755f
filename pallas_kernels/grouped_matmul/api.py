"""`gmm` and `tgmm`: grouped matmuls (the MoE expert matmuls), checks and backend dispatch.

    out = gmm(lhs, rhs, group_sizes)     # lhs [M, K], rhs [G, K, N], group_sizes [G] int32
    # rows [start_g, start_g + group_sizes[g]) of lhs times rhs[g]  ->  out [M, N]
    drhs = tgmm(lhs, dout, group_sizes)  # per group lhs_gᵀ @ dout_g  ->  [G, K, N]

Semantics are reference.py's, which are `jax.lax.ragged_dot`'s: rows past
sum(group_sizes) come back as 0 (sum < M is allowed: the MoE receive buffers of
sharding/expert.py end in padding rows), an empty group contributes nothing to gmm
and zeros to tgmm. Products accumulate in f32; the output has lhs's dtype unless
`preferred_element_type` is given. lhs and rhs of different float dtypes are both cast
to their promoted dtype first.

impl:
  "auto"        "pallas_gpu" on a GPU, else "ragged_dot" (on CPU the kernels run only
                in interpret mode: slow, for tests; on a TPU "pallas_tpu" joins "auto" once
                it has run compiled there).
  "pallas_gpu"  gpu.py (Pallas, Triton lowering); interpret mode off a GPU.
  "pallas_tpu"  tpu.py (Pallas TPU, megablox-style); interpret mode off a TPU.
  "ragged_dot"  `jax.lax.ragged_dot`; tgmm by `jax.lax.ragged_dot_general`.
  "reference"   reference.py (plain jnp).

Gradients: the Pallas impls go through one `jax.custom_vjp` whose backward runs the
same impl's kernels, dlhs = gmm(dout, rhsᵀ) (the kernel reads rhs transposed, no copy)
and drhs = tgmm(lhs, dout); group_sizes gets no cotangent. The backward runs in the
forward's compute dtype (a cotangent in another dtype is cast to it). "ragged_dot" and
"reference" are differentiated by jax itself, so "auto" on CPU is exactly ragged_dot.

Checks (ValueError naming the argument): ranks and shapes, float lhs/rhs, integer
group_sizes (any integer dtype, used as int32), and when group_sizes is concrete (not
traced) no negative size and sum(group_sizes) <= M. Traced sizes are clipped (negative
to 0, groups cut at row M) the same way in every backend.

A backend registers `Kernels(gmm, tgmm, tiles)`: `gmm(lhs, rhs, group_sizes, *,
transpose_rhs, out_dtype, tiles, interpret)`, `tgmm(lhs, dout, group_sizes, *, out_dtype,
tiles, interpret)`, and its tile-size class, which `tiles=` must be an instance of.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.grouped_matmul import reference

IMPLS = ("auto", "pallas_gpu", "pallas_tpu", "ragged_dot", "reference")
PALLAS_IMPLS = ("pallas_gpu", "pallas_tpu")


class Kernels(NamedTuple):
    """A Pallas backend: its two kernels (no gradients of their own) and its tile class."""

    gmm: Callable
    tgmm: Callable
    tiles: type


_BACKENDS: dict[str, Kernels] = {}


def register_backend(name: str, kernels: Kernels) -> None:
    if name not in PALLAS_IMPLS:
        raise ValueError(f"backend {name=} must be one of {PALLAS_IMPLS}")
    _BACKENDS[name] = kernels


def resolve_impl(impl: str) -> str:
    """The impl that runs: "auto" becomes the platform's kernel, or ragged_dot on CPU."""
    if impl not in IMPLS:
        raise ValueError(f"grouped matmul {impl=} must be one of {IMPLS}")
    if impl != "auto":
        return impl
    # The TPU kernel has not yet run compiled on a TPU (the GPU one has, on an H200):
    # until it has, "auto" on a TPU keeps jax.lax.ragged_dot (XLA:TPU lowers it natively).
    platform = jax.default_backend()
    return {"gpu": "pallas_gpu", "cuda": "pallas_gpu"}.get(platform, "ragged_dot")


# ----------------------------------------------------------------------------- checks
def _check_float(name: str, x) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name}.dtype={x.dtype} must be a floating dtype (float32, bfloat16, "
                         "float16)")


def _check_group_sizes(group_sizes, num_groups: int, num_rows: int, groups_from: str) -> None:
    if group_sizes.ndim != 1 or group_sizes.shape[0] != num_groups:
        raise ValueError(f"group_sizes must be 1-D of length {num_groups} ({groups_from}), got "
                         f"shape {group_sizes.shape}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes.dtype={group_sizes.dtype} must be an integer dtype "
                         "(int32; other integer dtypes are converted to it)")
    if isinstance(group_sizes, jax.core.Tracer):
        return  # traced: clipped as reference.group_bounds says
    sizes = np.asarray(group_sizes)
    if (sizes < 0).any():
        raise ValueError(f"group_sizes must be >= 0, got {sizes.tolist()}")
    if sizes.sum() > num_rows:
        raise ValueError(f"sum(group_sizes)={int(sizes.sum())} must be <= the {num_rows} rows of "
                         "lhs (rows past the sum are allowed: they come back as 0)")


def _check_common(lhs, group_sizes, preferred_element_type, tiles, impl: str):
    """Checks shared by gmm and tgmm; returns the resolved impl."""
    impl = resolve_impl(impl)
    if lhs.ndim != 2:
        raise ValueError(f"lhs must be 2-D [M, K], got {lhs.shape=}")
    _check_float("lhs", lhs)
    if preferred_element_type is not None and not jnp.issubdtype(preferred_element_type,
                                                                 jnp.floating):
        raise ValueError(f"{preferred_element_type=} must be None or a floating dtype")
    if impl in PALLAS_IMPLS:
        if impl not in _BACKENDS:
            raise ValueError(f"grouped matmul {impl=} is not available in this jax build; "
                             f"have {sorted(_BACKENDS)}")
        cls = _BACKENDS[impl].tiles
        if tiles is not None and not isinstance(tiles, cls):
            raise ValueError(f"tiles must be None or a {cls.__module__}.{cls.__qualname__} for "
                             f"{impl=}, got {tiles!r}")
    return impl


def _compute_dtypes(a, b):
    dt = jnp.promote_types(a.dtype, b.dtype)
    return a.astype(dt), b.astype(dt)


# ----------------------------------------------------------------------------- custom_vjp
@dataclasses.dataclass(frozen=True)
class _Static:
    """Hashable, non-differentiable arguments of the custom_vjp."""

    impl: str
    out_dtype: Any
    tiles: Any
    interpret: Any


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm_pallas(lhs, rhs, group_sizes, static: _Static):
    k = _BACKENDS[static.impl]
    return k.gmm(lhs, rhs, group_sizes, transpose_rhs=False, out_dtype=static.out_dtype,
                 tiles=static.tiles, interpret=static.interpret)


def _gmm_pallas_fwd(lhs, rhs, group_sizes, static: _Static):
    return _gmm_pallas(lhs, rhs, group_sizes, static), (lhs, rhs, group_sizes)


# A jit of its own, so every MoE layer's backward reuses one traced jaxpr and XLA compiles
# its kernels once (traced per call, each kernel's locations carry that call's traceback,
# which makes each layer's kernel a distinct module; flash_attention/gpu.py does the same).
@functools.partial(jax.jit, static_argnums=0)
def _gmm_pallas_bwd(static: _Static, res, dout):
    lhs, rhs, group_sizes = res
    k = _BACKENDS[static.impl]
    dout = dout.astype(lhs.dtype)  # [M, N] in the compute dtype
    # dlhs[r] = dout[r] @ rhs[g]ᵀ for the rows of group g (trailing rows: 0).
    dlhs = k.gmm(dout, rhs, group_sizes, transpose_rhs=True, out_dtype=lhs.dtype,
                 tiles=static.tiles, interpret=static.interpret)
    drhs = k.tgmm(lhs, dout, group_sizes, out_dtype=rhs.dtype, tiles=static.tiles,
                  interpret=static.interpret)
    return dlhs, drhs, None


_gmm_pallas.defvjp(_gmm_pallas_fwd, _gmm_pallas_bwd)


# ----------------------------------------------------------------------------- public API
def gmm(lhs, rhs, group_sizes, *, impl: str = "auto", preferred_element_type=None, tiles=None,
        interpret=None):
    """Grouped matmul: lhs [M, K], rhs [G, K, N], group_sizes [G] -> [M, N].

    Rows [start_g, start_g + group_sizes[g]) of lhs times rhs[g]; rows past
    sum(group_sizes) give 0. Differentiable in lhs and rhs.

    Args:
      impl: see the module docstring.
      preferred_element_type: output dtype (default lhs.dtype); accumulation is f32.
      tiles: the backend's tile sizes (gpu.Tiles / tpu.Tiles), None for its defaults;
        ignored by "ragged_dot" and "reference".
      interpret: Pallas interpret mode; None picks it when the platform is not the
        kernel's (so "pallas_gpu"/"pallas_tpu" run anywhere).
    """
    impl = _check_common(lhs, group_sizes, preferred_element_type, tiles, impl)
    if rhs.ndim != 3 or rhs.shape[1] != lhs.shape[1]:
        raise ValueError(f"rhs must be 3-D [G, K, N] with K = lhs.shape[1] = {lhs.shape[1]}, "
                         f"got {rhs.shape=}")
    _check_float("rhs", rhs)
    m, g, n = lhs.shape[0], rhs.shape[0], rhs.shape[2]
    _check_group_sizes(group_sizes, g, m, "rhs.shape[0]")
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    group_sizes = group_sizes.astype(jnp.int32)
    lhs, rhs = _compute_dtypes(lhs, rhs)
    if impl == "ragged_dot":
        kw = {} if preferred_element_type is None else {"preferred_element_type": out_dtype}
        return jax.lax.ragged_dot(lhs, rhs, group_sizes, **kw).astype(out_dtype)
    if impl == "reference":
        return reference.gmm_reference(lhs, rhs, group_sizes, preferred_element_type=out_dtype)
    if min(m, g, n, lhs.shape[1]) == 0:  # nothing to launch
        return jnp.zeros((m, n), out_dtype)
    return _gmm_pallas(lhs, rhs, group_sizes, _Static(impl, out_dtype, tiles, interpret))


def tgmm(lhs, dout, group_sizes, *, impl: str = "auto", preferred_element_type=None, tiles=None,
         interpret=None):
    """Per-group lhs_gᵀ @ dout_g: lhs [M, K], dout [M, N], group_sizes [G] -> [G, K, N].

    gmm's weight gradient; an empty group gives zeros and rows past sum(group_sizes)
    count in no group. Arguments as in `gmm` (no custom gradient: for "ragged_dot" and
    "reference" jax differentiates it, the Pallas kernels are not differentiable).
    """
    impl = _check_common(lhs, group_sizes, preferred_element_type, tiles, impl)
    if dout.ndim != 2 or dout.shape[0] != lhs.shape[0]:
        raise ValueError(f"dout must be 2-D [M, N] with M = lhs.shape[0] = {lhs.shape[0]}, "
                         f"got {dout.shape=}")
    _check_float("dout", dout)
    if group_sizes.ndim != 1:
        raise ValueError(f"group_sizes must be 1-D [G], got shape {group_sizes.shape}")
    m, k, n, g = lhs.shape[0], lhs.shape[1], dout.shape[1], group_sizes.shape[0]
    _check_group_sizes(group_sizes, g, m, "its own length")
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    group_sizes = group_sizes.astype(jnp.int32)
    lhs, dout = _compute_dtypes(lhs, dout)
    if impl == "ragged_dot" and hasattr(jax.lax, "ragged_dot_general"):
        dims = jax.lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=(([0], [0]), ([], [])),  # contract the (ragged) rows
            lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
        kw = {} if preferred_element_type is None else {"preferred_element_type": out_dtype}
        return jax.lax.ragged_dot_general(lhs, dout, group_sizes, dims, **kw).astype(out_dtype)
    if impl in ("ragged_dot", "reference"):
        return reference.tgmm_reference(lhs, dout, group_sizes, preferred_element_type=out_dtype)
    if min(m, k, n, g) == 0:
        return jnp.zeros((g, k, n), out_dtype)
    return _BACKENDS[impl].tgmm(lhs, dout, group_sizes, out_dtype=out_dtype, tiles=tiles,
                                interpret=interpret)
