"""Each kernel of a model compiles once, however many layers call it.

A custom_vjp's backward is traced anew at each call; the kernel modules then carry each
call's traceback in their MLIR locations, so every layer's kernel became a distinct
module that XLA compiled again (GPT-2 1.3B, 24 layers, packed documents: minutes of
compile on an H200). The backward rules run under a jit of their own, which traces once.
Checked on CPU by lowering a two-layer gradient for CUDA (and TPU) and counting distinct
kernels.
"""
import hashlib
import re

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.flash_attention import gpu, tpu
from pallas_kernels.grouped_matmul import gmm

S = jax.ShapeDtypeStruct


def _kernels(fn, *shapes, platform="cuda"):
    """(number of Pallas kernel calls, number of distinct kernels) in fn's lowering."""
    if platform == "tpu":  # lowers on CPU inside an abstract TPU mesh
        device = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1,
                                             platform="tpu")
        with jax.sharding.use_abstract_mesh(
                jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
            text = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("tpu",)).as_text()
    else:
        text = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    calls = [line for line in text.splitlines() if "stablehlo.custom_call" in line and any(
        name in line for name in ("mosaic_gpu", "triton", "tpu_custom_call"))]
    # The kernel is the call's attributes; its operand and result names differ per call.
    bodies = [re.sub(r"^\s*%\S+ = ", "", re.sub(r"\(%[^)]*\)", "", c)) for c in calls]
    return len(calls), len({hashlib.sha256(b.encode()).hexdigest() for b in bodies})


def _two_layers(layer):
    def loss(x, *rest):
        y = layer(x, *rest)
        y = layer(y, *rest)  # a second call site: a traceback of its own
        return jnp.sum(y.astype(jnp.float32))
    return jax.grad(loss)


@pytest.mark.parametrize("hopper", [False, True])
def test_flash_attention_kernels_compile_once(monkeypatch, hopper):
    monkeypatch.setattr(gpu, "is_hopper", lambda: hopper)  # the choice as on that GPU
    layer = lambda x, seg: gpu.flash_attention(x, x, x, causal=True, segment_ids=seg,  # noqa: E731
                                               interpret=False)
    calls, distinct = _kernels(_two_layers(layer), S((2, 512, 4, 128), jnp.bfloat16),
                               S((2, 512), jnp.int32))
    # forward, dq and dk/dv: three kernels; the two layers share the backward's call.
    assert distinct == 3, (calls, distinct)


def test_tpu_flash_attention_kernels_compile_once():
    """The Mosaic TPU modules carry no per-call locations: six calls, three kernels."""
    layer = lambda x, seg: tpu.flash_attention_tpu(x, x, x, causal=True, segment_ids=seg,  # noqa: E731
                                                   interpret=False)
    calls, distinct = _kernels(_two_layers(layer), S((2, 512, 4, 128), jnp.bfloat16),
                               S((2, 512), jnp.int32), platform="tpu")
    assert distinct == 3, (calls, distinct)


def test_grouped_matmul_kernels_compile_once():
    layer = lambda x, w, sizes: gmm(x, w, sizes, impl="pallas_gpu", interpret=False)  # noqa: E731
    calls, distinct = _kernels(_two_layers(layer), S((256, 128), jnp.bfloat16),
                               S((4, 128, 128), jnp.bfloat16), S((4,), jnp.int32))
    assert distinct == 3, (calls, distinct)  # gmm forward, gmm of rhsᵀ, tgmm
