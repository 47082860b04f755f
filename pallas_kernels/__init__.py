"""Pallas kernels. `attention` is the one entry point the model layers call.

Each op has the same shape: api (checks + dispatch), reference (plain jnp), gpu and tpu
backends (Pallas; interpret mode on CPU).
"""
from pallas_kernels.flash_attention import flash_attention, mha_reference
from pallas_kernels.paged_attention import paged_attention

attention = flash_attention

__all__ = ["attention", "flash_attention", "mha_reference", "paged_attention"]
