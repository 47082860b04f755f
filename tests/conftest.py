"""Test harness: 8 emulated CPU devices, f32 matmuls, a `slow` marker.

XLA reads XLA_FLAGS once, when jax first initialises its backends, so this must run
before anything imports jax.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Full-precision matmuls on CPU so f32 tolerances are meaningful.
jax.config.update("jax_default_matmul_precision", "highest")
