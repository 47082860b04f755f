"""Pallas kernels. `attention` is the one entry point the model layers call; `gmm` the
grouped matmul of the MoE experts; `ssd` Mamba-2's state space layer.

Each op has the same shape: api (checks + dispatch), reference (plain jnp), gpu and tpu
backends (Pallas; interpret mode on CPU).
"""
import importlib

from pallas_kernels.flash_attention import flash_attention, mha_reference
from pallas_kernels.grouped_matmul import gmm, tgmm
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.ssd import ssd

attention = flash_attention

# The Pallas backend modules (flash attention's, grouped matmul's and ssd's register themselves
# with their api; paged attention's api registers wrappers that call them). They are
# imported here, with the package, not at the first call: jax 0.11's Pallas TPU module
# defines a config option that is part of jax's compilation-cache key, so importing it
# during the first trace made every function jitted until then compile again on its
# next call (on a GPU the serving engine's second run spent 5-8 s recompiling).
BACKEND_MODULES = ("pallas_kernels.flash_attention.gpu", "pallas_kernels.flash_attention.tpu",
                   "pallas_kernels.paged_attention.gpu", "pallas_kernels.paged_attention.tpu",
                   "pallas_kernels.grouped_matmul.gpu", "pallas_kernels.grouped_matmul.tpu",
                   "pallas_kernels.ssd.gpu", "pallas_kernels.ssd.gpu_bwd",
                   "pallas_kernels.ssd.tpu", "pallas_kernels.ssd.tpu_bwd")


def _import_backends() -> None:
    for name in BACKEND_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # a jax build without this Pallas backend
            pass


_import_backends()

__all__ = ["attention", "flash_attention", "gmm", "mha_reference", "paged_attention", "ssd",
           "tgmm"]
