"""A transformer block assembled from the config: attention + feed-forward with norms.

Norm placements (see arch/norms.py): pre, post, sandwich (Gemma), olmo2. The attention
is MHA/GQA (arch/attention.py) or MLA (arch/mla.py); the feed-forward is a dense MLP or
an MoE layer (arch/moe.py) depending on the layer index (`moe.first_k_dense`, `moe.every`).
Decoder blocks of an encoder-decoder model add cross-attention after self-attention.

Hybrids (arch/ssm.py): a layer of kind "mamba" has a Mamba-2 mixer in place of attention
(`self.mamba`; Jamba: with an MLP or MoE after it). With `model.block_mlp=False` a layer
is one sub-layer, as in Mamba-2 and Nemotron-H: its mixer alone, and layers of kind "mlp"
are a feed-forward alone.
"""
from __future__ import annotations

from flax import nnx

from arch.attention import LAYER_KINDS, OTHER_KINDS, Attention, layer_kind
from arch.common import check_choice
from arch.dropout import make_dropout, residual_rate
from arch.mlp import MLP
from arch.norms import PLACEMENTS, make_norm


def is_moe_layer(cfg, layer_idx: int) -> bool:
    moe = cfg.moe
    if moe is None:
        return False
    if layer_idx < moe.first_k_dense:
        return False
    return (layer_idx - moe.first_k_dense) % moe.every == moe.every - 1


class Block(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs, layer_idx: int = 0, cross_attention: bool = False):
        check_choice("model.norm_placement", cfg.norm_placement, PLACEMENTS)
        self.placement = cfg.norm_placement
        kind = layer_kind(cfg, layer_idx)
        check_choice("model.layer_pattern entry", kind, LAYER_KINDS + OTHER_KINDS)
        attn = mamba = mlp = None
        if kind == "mamba":
            from arch.ssm import Mamba2
            mamba = Mamba2(cfg, rngs=rngs)
        elif kind == "mlp":
            pass  # a feed-forward alone
        elif cfg.mla is not None:
            from arch.mla import MLAttention
            attn = MLAttention(cfg, rngs=rngs, layer_kind=kind)
        else:
            attn = Attention(cfg, rngs=rngs, layer_kind=kind)
        self.attn, self.mamba = attn, mamba
        has_mixer = kind != "mlp"
        if has_mixer and not cfg.get("block_mlp", True):
            pass  # one sub-layer per block: the mixer alone
        elif is_moe_layer(cfg, layer_idx):
            from arch.moe import MoE
            mlp = MoE(cfg, rngs=rngs)
        else:
            dense_dim = cfg.moe.dense_mlp_dim if cfg.moe is not None and cfg.moe.dense_mlp_dim else None
            mlp = MLP(cfg, rngs=rngs, mlp_dim=dense_dim)
        self.mlp = mlp
        p = self.placement
        has_mlp = mlp is not None
        # Norm on the branch input (pre, sandwich) or on the residual sum (post).
        self.attn_norm = make_norm(cfg) if has_mixer and p in ("pre", "sandwich", "post") else None
        self.mlp_norm = make_norm(cfg) if has_mlp and p in ("pre", "sandwich", "post") else None
        # Norm on the branch output (sandwich, olmo2).
        self.post_attn_norm = make_norm(cfg) if has_mixer and p in ("sandwich", "olmo2") else None
        self.post_mlp_norm = make_norm(cfg) if has_mlp and p in ("sandwich", "olmo2") else None
        self.cross_attn = Attention(cfg, rngs=rngs, layer_kind="global", cross=True) if cross_attention else None
        self.cross_norm = make_norm(cfg) if cross_attention else None
        # GPT-2's resid_pdrop: on each branch output before it joins the residual stream.
        self.resid_dropout = make_dropout(residual_rate(cfg), rngs)

    def _drop(self, y):
        return y if self.resid_dropout is None else self.resid_dropout(y)

    def _residual(self, x, branch, in_norm, out_norm):
        """Apply one residual sub-layer with this block's norm placement."""
        if self.placement == "post":
            y, aux = branch(x)
            return in_norm(x + self._drop(y)), aux
        h = in_norm(x) if in_norm is not None else x
        y, aux = branch(h)
        if out_norm is not None:
            y = out_norm(y)
        return x + self._drop(y), aux

    def __call__(self, x, *, positions, segment_ids=None, cache=None,
                 encoder_out=None, encoder_segment_ids=None):
        aux = {}
        mixer = self.attn if self.mamba is None else self.mamba
        if mixer is not None:
            x, a = self._residual(
                x, lambda h: mixer(h, positions=positions, segment_ids=segment_ids, cache=cache),
                self.attn_norm, self.post_attn_norm)
            aux.update(a)
        elif cache is not None:  # a feed-forward alone caches nothing; it keeps count
            aux["cache"] = cache.advance(segment_ids, x.shape[1])
        if self.cross_attn is not None:
            x, _ = self._residual(
                x, lambda h: self.cross_attn(h, positions=positions, segment_ids=segment_ids,
                                             kv_input=encoder_out, kv_segment_ids=encoder_segment_ids),
                self.cross_norm, None)

        def ffn(h):
            out = self.mlp(h, segment_ids=segment_ids) if not isinstance(self.mlp, MLP) else self.mlp(h)
            return out if isinstance(out, tuple) else (out, {})

        if self.mlp is not None:
            x, a = self._residual(x, ffn, self.mlp_norm, self.post_mlp_norm)
            aux.update(a)
        return x, aux
