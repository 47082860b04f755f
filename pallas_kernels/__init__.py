"""Pallas kernels. `attention` is the one entry point the model layers call."""
from pallas_kernels.flash_attention import flash_attention, mha_reference

attention = flash_attention

__all__ = ["attention", "flash_attention", "mha_reference"]
