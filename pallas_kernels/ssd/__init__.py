"""SSD (Mamba-2): api (dispatch + checks), reference (recurrence, chunked jnp), gpu/tpu (Pallas)."""
from pallas_kernels.ssd.api import IMPLS, PALLAS_IMPLS, register_backend, ssd
from pallas_kernels.ssd.reference import ssd_chunked, ssd_recurrence, ssd_step

__all__ = ["IMPLS", "PALLAS_IMPLS", "register_backend", "ssd", "ssd_chunked", "ssd_recurrence",
           "ssd_step"]
