"""Grouped matmul in plain jnp: the semantics every backend of api.py must reproduce.

The rows of `lhs` are split into G consecutive groups, group g holding
`group_sizes[g]` rows starting at start_g = group_sizes[0] + ... + group_sizes[g-1]:

    gmm:   out[r]  = lhs[r] @ rhs[g]                 for r in [start_g, start_g + size_g)
           out[r]  = 0                               for rows past sum(group_sizes)
    tgmm:  out[g]  = lhs[start_g:end_g].T @ dout[start_g:end_g]      (0 for an empty group)

gmm is `jax.lax.ragged_dot`; tgmm is the weight gradient of gmm (the ragged-contracting
`jax.lax.ragged_dot_general`). Products are accumulated in f32; the output has lhs's
dtype unless `preferred_element_type` says otherwise. Sizes are clipped at 0 and a group
reaching past row M is cut at M (api.py refuses both when the sizes are concrete; traced
sizes get this clipped meaning, the same in every backend).

    import jax.numpy as jnp
    from pallas_kernels.grouped_matmul import reference
    lhs = jnp.ones((6, 4)); rhs = jnp.stack([jnp.ones((4, 3)), 2 * jnp.ones((4, 3))])
    reference.gmm_reference(lhs, rhs, jnp.array([2, 3], jnp.int32))[:, 0]   # [4 4 8 8 8 0]
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def group_bounds(group_sizes, num_rows: int):
    """(starts [G], ends [G]) int32 row bounds of the groups, sizes clipped to [0, num_rows]."""
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    ends = jnp.minimum(jnp.cumsum(sizes), num_rows).astype(jnp.int32)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    return starts, ends


def _rows_in(starts, ends, num_rows):
    """[G, M] bool: row r belongs to group g."""
    rows = jnp.arange(num_rows, dtype=jnp.int32)[None, :]
    return (rows >= starts[:, None]) & (rows < ends[:, None])


def gmm_reference(lhs, rhs, group_sizes, *, preferred_element_type=None):
    """lhs [M, K], rhs [G, K, N], group_sizes [G] -> [M, N]: each group's rows times its rhs."""
    m = lhs.shape[0]
    out_dtype = preferred_element_type or lhs.dtype
    in_group = _rows_in(*group_bounds(group_sizes, m), m)  # [G, M]

    def add_group(out, xs):  # one group: all rows times rhs[g], kept where the rows are g's
        w, mask = xs  # [K, N], [M]
        y = jnp.dot(lhs, w, preferred_element_type=jnp.float32)  # [M, N]
        return out + jnp.where(mask[:, None], y, 0.0), None

    out = jnp.zeros((m, rhs.shape[2]), jnp.float32)
    out, _ = jax.lax.scan(add_group, out, (rhs, in_group))
    return out.astype(out_dtype)


def tgmm_reference(lhs, dout, group_sizes, *, preferred_element_type=None):
    """lhs [M, K], dout [M, N], group_sizes [G] -> [G, K, N]: lhs_gᵀ @ dout_g per group."""
    m = lhs.shape[0]
    out_dtype = preferred_element_type or lhs.dtype
    in_group = _rows_in(*group_bounds(group_sizes, m), m)  # [G, M]

    def one_group(mask):  # [M] -> [K, N]
        x = jnp.where(mask[:, None], lhs, 0)
        return jnp.dot(x.T, dout, preferred_element_type=jnp.float32)

    return jax.lax.map(one_group, in_group).astype(out_dtype)
