"""The Pallas backends are imported with the package, so no kernel call imports a module.

jax 0.11's Pallas TPU module defines a config option that is part of jax's compilation-
cache key; imported during the first trace (as our backends once were), it changed the
key, and every function jitted until then compiled a second time on its next call.
"""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A fresh interpreter: in the test process the modules are long imported.
SCRIPT = """
import sys
import jax, jax.numpy as jnp
from jax._src import config as jax_config
import pallas_kernels

missing = [m for m in pallas_kernels.BACKEND_MODULES if m not in sys.modules]
assert not missing, f"not imported with the package: {missing}"
modules, keys = set(sys.modules), list(jax_config.trace_context_names())
q = jnp.ones((1, 16, 2, 16), jnp.float32)
for impl in ("pallas_gpu", "pallas_tpu"):
    pallas_kernels.flash_attention(q, q, q, impl=impl).block_until_ready()
pages = jnp.ones((1, 4, 16, 128), jnp.float32)
table, lengths = jnp.arange(4, dtype=jnp.int32)[None], jnp.array([40], jnp.int32)
for impl in ("pallas_gpu", "pallas_tpu"):
    pallas_kernels.paged_attention(jnp.ones((1, 2, 128)), pages, pages, lengths, table, impl=impl)
new = sorted(m for m in set(sys.modules) - modules if "pallas" in m or "mosaic" in m)
assert list(jax_config.trace_context_names()) == keys, "a kernel call changed jax's cache key"
print("new pallas modules:", new)
"""


def test_kernel_calls_import_no_backend_and_keep_the_jit_cache_key():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    # Calls may still import jax's own lowering internals, but none of our backends.
    assert "pallas_kernels" not in out.stdout, out.stdout
