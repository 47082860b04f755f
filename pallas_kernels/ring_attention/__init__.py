"""Ring and striped attention (sequence / context parallelism); see api.py."""
from pallas_kernels.ring_attention.api import (
                                               merge_partials,
                                               ring_attention,
                                               ring_attention_in_layout,
                                               ring_attention_shard,
)
from pallas_kernels.ring_attention.block import RING_IMPLS
from pallas_kernels.ring_attention.layout import LAYOUTS, from_layout, layout_positions, to_layout
from pallas_kernels.ring_attention.work import tile_counts

__all__ = ["LAYOUTS", "RING_IMPLS", "from_layout", "layout_positions", "merge_partials",
           "ring_attention", "ring_attention_in_layout", "ring_attention_shard", "tile_counts",
           "to_layout"]
