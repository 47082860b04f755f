"""Flash attention: api (dispatch + checks), reference (plain jnp), gpu/tpu (Pallas)."""
from pallas_kernels.flash_attention.api import (
    DROPOUT_IMPLS,
    IMPLS,
    flash_attention,
    register_backend,
)
from pallas_kernels.flash_attention.reference import max_logits_reference, mha_reference

__all__ = ["DROPOUT_IMPLS", "IMPLS", "flash_attention", "register_backend", "mha_reference",
           "max_logits_reference"]
