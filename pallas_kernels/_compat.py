"""The one place for API differences between jax 0.10.x (CPU/CI) and 0.11.x (GPU machines)."""
from __future__ import annotations

import jax

JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())

# Both supported versions expose shard_map at the top level (the experimental module is
# deprecated); keep every import of it going through here so a future move is one line.
shard_map = jax.shard_map


def mgpu_load(ref, *, layout):
    """`plgpu.load` of a whole Mosaic GPU ref into registers with `layout`.

    jax 0.11 indexes on the ref (`ref.at[...]`) and deprecates the separate `idx`
    argument that jax 0.10 still requires; both give the same kernel.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if JAX_VERSION >= (0, 11):
        return plgpu.load(ref, layout=layout)
    return plgpu.load(ref, (), layout=layout)
