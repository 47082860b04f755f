"""Paged decode attention: api (dispatch + checks), reference (plain jnp), gpu/tpu (Pallas)."""
from pallas_kernels.paged_attention.api import IMPLS, paged_attention, register_backend
from pallas_kernels.paged_attention.reference import gather_pages, paged_attention_reference

__all__ = ["IMPLS", "paged_attention", "register_backend", "gather_pages",
           "paged_attention_reference"]
