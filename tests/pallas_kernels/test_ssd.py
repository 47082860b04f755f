"""SSD (pallas_kernels/ssd): the chunked form and the kernels against the recurrence.

The recurrence (reference.ssd_recurrence, a scan over tokens) defines the semantics;
the chunked jnp form must equal it in values and gradients for any length and chunk
size, with segment resets and an initial state; the Pallas kernels (interpret mode on
CPU, compiled on their device) must equal it in values, and through the api's
custom_vjp in gradients. Interpret mode compiles slowly, so each kernel case packs every
feature (groups, odd sizes, segments, initial state, several chunks and row tiles).
"""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ssd import api, gpu, gpu_bwd, reference, ssd, ssd_step, tpu, tpu_bwd

ON_GPU = jax.default_backend() == "gpu"
ON_TPU = jax.default_backend() == "tpu"


def _inputs(seed=0, b=2, t=37, h=4, p=8, g=2, n=16, dtype=jnp.float32):
    """Random inputs (numpy's generator: no jax op to compile per shape)."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    x = jnp.asarray(normal(b, t, h, p), dtype)
    dt = jnp.asarray(np.log1p(np.exp(normal(b, t, h) - 1.0)))           # softplus
    A = jnp.asarray(-np.exp(rng.uniform(-1.0, 1.5, h)).astype(np.float32))
    B = jnp.asarray(normal(b, t, g, n), dtype)
    C = jnp.asarray(normal(b, t, g, n), dtype)
    D = jnp.asarray(normal(h))
    init = jnp.asarray(normal(b, h, p, n))
    # Row 0: three documents and padding; row 1: one boundary inside the first chunk.
    cuts = [[0] * 11 + [1] * 15 + [2] * (t - 31) + [0] * 5 if t > 31 else [1] * t,
            [3] * 5 + [4] * (t - 5) if t > 5 else [3] * t]
    seg = jnp.asarray(np.array(cuts, np.int32)[:b])
    return dict(x=x, dt=dt, A=A, B=B, C=C, D=D, initial_state=init, segment_ids=seg)


def numpy_ssd(x, dt, A, B, C, D, initial_state, segment_ids):
    """float64 numpy oracle: each document (run of equal segment ids) from its own state."""
    x, dt, A, B, C, D = (np.asarray(v, np.float64) for v in (x, dt, A, B, C, D))
    seg = np.asarray(segment_ids)
    b, t, h, p = x.shape
    rep = h // B.shape[2]
    y = np.zeros_like(x)
    final = np.zeros((b, h, p, B.shape[-1]))
    for r in range(b):
        state = np.asarray(initial_state[r], np.float64)
        for i in range(t):
            if i > 0 and seg[r, i] != seg[r, i - 1]:
                state = np.zeros_like(state)  # a new document starts from nothing
            for hh in range(h):
                g = hh // rep
                state[hh] = (np.exp(dt[r, i, hh] * A[hh]) * state[hh]
                             + dt[r, i, hh] * np.outer(x[r, i, hh], B[r, i, g]))
                y[r, i, hh] = state[hh] @ C[r, i, g] + D[hh] * x[r, i, hh]
        final[r] = state
    return y, final


FLOATS = ("x", "dt", "A", "B", "C", "D", "initial_state")


def _outputs_and_grads(fn, args):
    """(y, final state) and the gradients of a scalar of both in every float input."""
    def loss(*floats):
        y, state = fn(**dict(zip(FLOATS, floats, strict=True)), segment_ids=args["segment_ids"])
        yf = y.astype(jnp.float32)
        return jnp.sum(yf * jnp.cos(yf)) + jnp.sum(state * jnp.sin(state)), (y, state)

    (_, out), grads = jax.value_and_grad(loss, argnums=tuple(range(len(FLOATS))), has_aux=True)(
        *(args[k] for k in FLOATS))
    return out, grads


_jit_outputs_and_grads = jax.jit(_outputs_and_grads, static_argnums=0)


@pytest.fixture(scope="module")
def case():
    """Inputs with every feature (T=45: no chunk size below divides it; head_dim 12 and
    d_state 10 are padded by the GPU kernel), the recurrence's outputs and gradients."""
    args = _inputs(t=45, p=12, n=10)
    return args, _jit_outputs_and_grads(reference.ssd_recurrence, args)


def test_recurrence_equals_float64_documents(case):
    """The definition: each packed document runs alone, the first from the initial state."""
    args, ((y, s), _) = case
    y64, s64 = numpy_ssd(**args)
    np.testing.assert_allclose(y, y64, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(s, s64, atol=2e-5, rtol=2e-5)


def test_chunked_equals_recurrence_in_values_and_grads(case):
    args, want = case
    got = _jit_outputs_and_grads(functools.partial(reference.ssd_chunked, chunk_size=16), args)
    chex.assert_trees_all_close(got, want, atol=5e-4, rtol=5e-4)
    # A chunk longer than the sequence, and one of a few tokens: the same values.
    for chunk in (64,):
        out = jax.jit(functools.partial(reference.ssd_chunked, chunk_size=chunk))(**args)
        chex.assert_trees_all_close(out, want[0], atol=2e-5, rtol=2e-5)


def test_step_equals_recurrence():
    a = _inputs(t=5)

    @jax.jit
    def steps(x, dt, A, B, C, D, initial_state):
        state, ys = initial_state, []
        for i in range(x.shape[1]):
            yi, state = ssd_step(state, x[:, i], dt[:, i], A, B[:, i], C[:, i], D=D)
            ys.append(yi)
        # dt = 0 (how the layers skip padding) leaves the state as it was.
        _, same = ssd_step(state, x[:, 0], jnp.zeros_like(dt[:, 0]), A, B[:, 0], C[:, 0])
        return jnp.stack(ys, 1), state, same

    y, s, same = steps(*(a[k] for k in FLOATS))
    y64, s64 = numpy_ssd(**{**a, "segment_ids": jnp.ones_like(a["segment_ids"])})
    np.testing.assert_allclose(y, y64, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(s, s64, atol=2e-5, rtol=2e-5)
    chex.assert_trees_all_close(same, s)


# ----------------------------------------------------------------------------- kernels
# 2 row tiles per chunk of the GPU chunk scan; chunk sizes that do not divide T = 45.
GPU_TILES = gpu.BlockSizes(block_q=16, block_p=16, block_n=16)
KERNELS = {"pallas_gpu": dict(chunk_size=32, block_sizes=GPU_TILES),
           "pallas_tpu": dict(chunk_size=16)}


def _tolerance():
    return dict(atol=2e-3, rtol=2e-3) if (ON_GPU or ON_TPU) else dict(atol=1e-4, rtol=1e-4)


def test_gpu_kernel_values_and_grads(case):
    """Values against the recurrence; gradients of the kernel backward (gpu_bwd.py) against
    the recurrence's autodiff."""
    args, (want_out, want_grads) = case
    kernel = functools.partial(ssd, impl="pallas_gpu", return_final_state=True,
                               **KERNELS["pallas_gpu"])
    out, grads = _jit_outputs_and_grads(kernel, args)
    chex.assert_trees_all_close(out, want_out, **_tolerance())
    # dL/dy depends on y, so kernel rounding shows a little more in the gradients.
    chex.assert_trees_all_close(grads, want_grads, atol=1e-3, rtol=1e-3)


def test_tpu_kernel_values_and_grads(case):
    """Values against the recurrence; gradients of the kernel backward (tpu_bwd.py) against
    the recurrence's autodiff."""
    args, (want_out, want_grads) = case
    kernel = functools.partial(ssd, impl="pallas_tpu", return_final_state=True,
                               **KERNELS["pallas_tpu"])
    out, grads = _jit_outputs_and_grads(kernel, args)
    chex.assert_trees_all_close(out, want_out, **_tolerance())
    chex.assert_trees_all_close(grads, want_grads, atol=1e-3, rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("impl", list(KERNELS))
def test_kernels_bf16(impl):
    """bf16 inputs (matmul operands bf16, states f32) with the default tiles."""
    a = _inputs(seed=1, b=1, t=70, h=2, p=16, g=1, n=16, dtype=jnp.bfloat16)
    kw = dict(x=a["x"], dt=a["dt"], A=a["A"], B=a["B"], C=a["C"], segment_ids=a["segment_ids"])
    y, s = ssd(**kw, chunk_size=64 if impl == "pallas_gpu" else 32, impl=impl,
               return_final_state=True)
    assert y.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    y_ref, s_ref = reference.ssd_recurrence(**kw)
    chex.assert_trees_all_close((y.astype(jnp.float32), s), (y_ref.astype(jnp.float32), s_ref),
                                atol=0.1, rtol=0.05)


def test_kernels_lower_for_their_devices():
    """On CPU the kernels lower to Triton IR (GPU) and Mosaic (TPU): shape and op errors
    of the compiled paths show here."""
    b, t, h, p, g, n = 2, 300, 8, 64, 2, 128
    S = jax.ShapeDtypeStruct
    shapes = (S((b, t, h, p), jnp.bfloat16), S((b, t, h), jnp.float32), S((h,), jnp.float32),
              S((b, t, g, n), jnp.bfloat16), S((b, t, g, n), jnp.bfloat16), S((h,), jnp.float32),
              S((b, t), jnp.int32), S((b, h, p, n), jnp.float32))
    fwd = jax.jit(lambda *a: gpu.ssd_forward(*a, chunk_size=64, interpret=False))
    text = fwd.trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3  # chunk_state, state_passing, chunk_scan
    # The backward: chunk_state and state_passing (recompute, then dS and its reverse pass),
    # rows and cols: 6 kernels, and the forward's 3 under the vjp.
    cot = (S((b, t, h, p), jnp.bfloat16), S((b, h, p, n), jnp.float32))
    bwd = jax.jit(lambda *a: gpu_bwd.ssd_backward(*a[:8], *a[8:], chunk_size=64, interpret=False))
    text = bwd.trace(*shapes, *cot).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 6
    grad = jax.jit(jax.value_and_grad(lambda *a: api.ssd(*a[:5], D=a[5], segment_ids=a[6], initial_state=a[7],
                                               impl="pallas_gpu", interpret=False)
                            .astype(jnp.float32).sum(), argnums=(0, 1, 2, 3, 4, 5, 7)))
    text = grad.trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 9
    fwd = jax.jit(lambda *a: tpu.ssd_forward(*a, chunk_size=128, interpret=False))
    device = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
    with jax.sharding.use_abstract_mesh(
            jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
        text = fwd.trace(*shapes).lower(lowering_platforms=("tpu",)).as_text()
        assert text.count("tpu_custom_call") == 1
        bwd = jax.jit(lambda *a: tpu_bwd.ssd_backward(*a[:8], *a[8:], chunk_size=128,
                                                      interpret=False))
        text = bwd.trace(*shapes, *cot).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 2  # the states, then the reverse pass


# ----------------------------------------------------------------------------- api
def test_auto_and_bad_input():
    a = _inputs(t=9)
    kw = {k: a[k] for k in ("x", "dt", "A", "B", "C")}
    # The GPU kernel is in "auto" (timed faster, fwd+bwd); the TPU one not until timed.
    assert api.resolve_impl("auto") == ("pallas_gpu" if ON_GPU else "chunked")
    platform_kernel = "pallas_gpu" if ON_GPU else "pallas_tpu" if ON_TPU else "chunked"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api, "KERNELS_IN_AUTO", ("gpu", "tpu"))
        assert api.resolve_impl("auto") == platform_kernel
    with pytest.raises(ValueError, match="impl"):
        ssd(**kw, impl="triton")
    with pytest.raises(ValueError, match="power-of-two chunk_size"):
        ssd(**kw, chunk_size=24, impl="pallas_gpu")       # asked for by name: refused
    with pytest.raises(ValueError, match="chunk_size"):
        ssd(**kw, chunk_size=0)
    with pytest.raises(ValueError, match="divisible by groups"):
        ssd(**{**kw, "B": a["B"][:, :, :1].repeat(3, 2), "C": a["C"][:, :, :1].repeat(3, 2)})
    with pytest.raises(ValueError, match="dt must be"):
        ssd(**{**kw, "dt": a["dt"][:, :, :1]})
    with pytest.raises(ValueError, match="initial_state"):
        ssd(**kw, initial_state=a["initial_state"][:, :1])
    with pytest.raises(ValueError, match="segment_ids"):
        ssd(**kw, segment_ids=jnp.zeros((2, 9), jnp.float32))
    with pytest.raises(ValueError, match="BlockSizes.block_q"):
        gpu.BlockSizes(block_q=24)


def test_chunked_never_builds_a_pairwise_product_per_channel():
    """The chunked form's largest intermediate, forward and backward, is a [B, H, nc, Q, Q]
    decay matrix or a [B, nc, H, P, N] state, never a [B, nc, Q, Q, H, P] product: a
    many-operand einsum once built those (48 GiB in a 1B hybrid's step on a GPU)."""
    b, t, h, p, g, n, q = 1, 256, 4, 16, 1, 8, 64
    kw = _inputs(b=b, t=t, h=h, p=p, g=g, n=n)
    args = [kw[k] for k in ("x", "dt", "A", "B", "C", "D")]

    def loss(x, dt, A, B, C, D):
        return reference.ssd_chunked(x, dt, A, B, C, chunk_size=q, D=D)[0].sum()

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=tuple(range(6))))(*args)
    allowed = max(b * h * t * q, b * (t // q) * h * p * n, b * t * h * p)
    sizes = [int(np.prod(v.aval.shape)) for e in jaxpr.jaxpr.eqns for v in e.outvars]
    assert max(sizes) <= allowed, (max(sizes), allowed)
