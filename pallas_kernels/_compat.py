"""The one place for API differences between jax 0.10.x (CPU/CI) and 0.11.x (GPU machines)."""
from __future__ import annotations

import jax

JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())

# Both supported versions expose shard_map at the top level (the experimental module is
# deprecated); keep every import of it going through here so a future move is one line.
shard_map = jax.shard_map
