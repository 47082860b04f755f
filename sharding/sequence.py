"""Sequence (context) parallelism: activations split along the sequence, ring attention.

With `mesh.sequence = N > 1` every activation [B, T, ...] is split in N slices of T/N
tokens over the `sequence` axis (the "+sequence" rules of rules.py). Everything in a
transformer but attention is per token and needs nothing more; attention runs as ring
attention (pallas_kernels/ring_attention: Liu et al. 2023, Brandon et al. 2023) so no
device ever holds the whole sequence's K/V.

Which tokens a device holds is the layout (contiguous or striped). The model does not
care: a batch is permuted ONCE into the layout at the input (`batch_to_layout`: tokens,
targets, loss mask, segment ids and positions move together), the model runs on the
permuted tokens with their true positions (RoPE and the attention masks read
positions), and a per-token loss is the same sum in any order. Striped balances causal
attention over the ring; contiguous needs no permutation.

Switching attention to the ring: inside `sequence_parallel(mesh)` (or whenever the
active mesh, `sharding.activate` / `jax.set_mesh`, has a `sequence` axis > 1),
`attention_impl(cfg.attention_impl)` answers "ring", and `ring_backend` is the
flash-attention backend of that name: global arrays in, ring attention inside
`shard_map` over the mesh, global arrays out.

    >>> import numpy as np
    >>> from sharding.sequence import batch_to_layout
    >>> batch = {"tokens": np.arange(8)[None]}
    >>> batch_to_layout(batch, 2, "striped")["positions"]       # true positions travel along
    array([[0, 2, 4, 6, 1, 3, 5, 7]], dtype=int32)

Trace (first call of) the jitted step inside the context: like `sharding.activate`, it
is read while tracing.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Iterator, Mapping

import jax
import numpy as np

from pallas_kernels.ring_attention.block import RING_IMPLS
from pallas_kernels.ring_attention.layout import LAYOUTS, from_layout, layout_positions, to_layout
from sharding.mesh import axis_size

__all__ = ["LAYOUTS", "SequenceParallel", "active", "attention_impl", "batch_from_layout",
           "batch_to_layout", "from_layout", "layout_positions", "ring_backend",
           "sequence_parallel", "to_layout"]

SEQUENCE_AXIS = "sequence"


@dataclasses.dataclass(frozen=True)
class SequenceParallel:
    """Settings of the ring for the model's attention layers."""

    mesh: object = None               # Mesh; None: the active mesh (jax.set_mesh)
    axis_name: str = SEQUENCE_AXIS    # the ring axis
    impl: str = "auto"                # block worker: one of RING_IMPLS


_ACTIVE: contextvars.ContextVar[SequenceParallel | None] = contextvars.ContextVar(
    "sequence_parallel", default=None)


@contextlib.contextmanager
def sequence_parallel(mesh=None, *, axis_name: str = SEQUENCE_AXIS,
                      impl: str = "auto") -> Iterator[SequenceParallel]:
    """Make attention layers traced inside use ring attention over `axis_name` of `mesh`.

    The layout is the batch's business (`batch_to_layout`): the ring masks by the
    positions the layer passes, so it is exact for any token order.

    Raises:
      ValueError: naming the argument, for an unknown impl or an axis the mesh lacks.
    """
    if impl not in RING_IMPLS:
        raise ValueError(f"{impl=} must be one of {RING_IMPLS}")
    if mesh is not None and axis_name not in dict(mesh.shape):
        raise ValueError(f"{axis_name=} is not an axis of the mesh; its axes are "
                         f"{tuple(dict(mesh.shape))}")
    token = _ACTIVE.set(SequenceParallel(mesh, axis_name, impl))
    try:
        yield _ACTIVE.get()
    finally:
        _ACTIVE.reset(token)


def _ambient_mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def active() -> SequenceParallel | None:
    """The ring settings in force: those of `sequence_parallel`, or defaults when the
    active mesh has a `sequence` axis > 1; None when attention is not sequence-parallel."""
    sp = _ACTIVE.get()
    if sp is not None:
        return sp
    mesh = _ambient_mesh()
    if mesh is not None and axis_size(mesh, SEQUENCE_AXIS) > 1:
        return SequenceParallel()
    return None


def attention_impl(impl: str) -> str:
    """The attention impl a layer should use: "ring" when sequence-parallel, else `impl`."""
    return "ring" if active() is not None else impl


def ring_backend(q, k, v, *, causal=False, sliding_window=None, segment_ids=None,
                 q_positions=None, kv_positions=None, logit_soft_cap=None, sm_scale=None,
                 sinks=None, block_sizes=None):
    """The "ring" backend of `flash_attention`: same signature as the other backends.

    q, k, v are the layer's global [B, T, H, D] arrays, in whatever layout the batch
    was put in; `q_positions` (= `kv_positions`, [B, T]) are the tokens' true positions,
    default 0..T-1 in array order (right for the contiguous layout only).
    """
    from pallas_kernels.ring_attention.api import ring_attention_in_layout

    sp = active() or SequenceParallel()
    mesh = sp.mesh if sp.mesh is not None else _ambient_mesh()
    if mesh is None:
        raise ValueError("attention impl='ring' needs a mesh: pass one to "
                         "sharding.sequence.sequence_parallel(mesh) or set one with jax.set_mesh")
    if q.shape[1] != k.shape[1] or isinstance(segment_ids, (tuple, list)):
        raise ValueError("attention impl='ring' is self-attention only (q and kv of equal length)")
    if (q_positions is None) != (kv_positions is None):
        raise ValueError("q_positions and kv_positions must be given together")
    # Self-attention: one position per token (the layer passes the same array twice).
    return ring_attention_in_layout(
        q, k, v, mesh=mesh, positions=q_positions, segment_ids=segment_ids,
        axis_name=sp.axis_name, causal=causal, sliding_window=sliding_window,
        logit_soft_cap=logit_soft_cap, sm_scale=sm_scale, sinks=sinks, impl=sp.impl,
        block_sizes=block_sizes)


def _register() -> None:
    """Register "ring" with flash_attention's dispatch when its IMPLS list names it."""
    from pallas_kernels.flash_attention import api
    if "ring" in api.IMPLS:
        api.register_backend("ring", ring_backend)


_register()


# ----------------------------------------------------------------------------- batches
def batch_to_layout(batch: Mapping[str, np.ndarray], n: int, layout: str, *, stripe: int = 1,
                    seq_axis: int = 1) -> dict:
    """Permute every [B, T, ...] entry of a batch into the layout; add true `positions`.

    Entries with fewer than 2 dims are kept as they are. When the batch has no
    `positions`, the natural 0..T-1 are added first, so the model sees the true
    position of each permuted token (RoPE and masks need them).

    Args:
      batch: dict of numpy or jax arrays sharing the sequence length on `seq_axis`.
      n: ring size (`mesh.sequence`).
      layout: "striped" or "contiguous".

    Raises:
      ValueError: for an unknown layout, or a length not divisible by n (x stripe).
    """
    out = dict(batch)
    seqs = {key: x.shape[seq_axis] for key, x in batch.items() if np.ndim(x) > seq_axis}
    if len(set(seqs.values())) > 1:
        raise ValueError(f"batch entries disagree on the sequence length: {seqs}")
    if not seqs:
        raise ValueError(f"batch has no entry with a sequence axis {seq_axis}")
    if "positions" not in out:
        b, t = next(x.shape[:2] for key, x in batch.items() if key in seqs)
        out["positions"] = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    for key in seqs.keys() | {"positions"}:
        out[key] = to_layout(out[key], n, layout, axis=seq_axis, stripe=stripe)
    return out


def batch_from_layout(batch: Mapping[str, np.ndarray], n: int, layout: str, *, stripe: int = 1,
                      seq_axis: int = 1) -> dict:
    """Inverse of `batch_to_layout` on the entries with a sequence axis (e.g. logits)."""
    return {key: from_layout(x, n, layout, axis=seq_axis, stripe=stripe)
            if np.ndim(x) > seq_axis else x for key, x in batch.items()}

