"""Grouped matmul (the MoE expert matmuls): api (dispatch + checks), reference (plain
jnp), schedule (the kernels' work items), gpu/tpu (Pallas)."""
from pallas_kernels.grouped_matmul.api import IMPLS, gmm, register_backend, tgmm
from pallas_kernels.grouped_matmul.reference import gmm_reference, tgmm_reference

__all__ = ["IMPLS", "gmm", "tgmm", "register_backend", "gmm_reference", "tgmm_reference"]
