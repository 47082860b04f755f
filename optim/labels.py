"""Which optimizer updates which parameter: Muon for hidden matrices, AdamW for the rest.

Muon (Jordan et al. 2024) is defined for the weight matrix of a linear map x @ W, so a
parameter goes to Muon when it *is* one (or a stack of them) and to AdamW otherwise:

  muon    2-D hidden kernels; attention kernels like q [embed, heads, head_dim] or
          o [heads, head_dim, embed] (flattened to one matrix, or one per head);
          stacked kernels with a leading `layers` (nnx.scan) or `expert` axis, where
          every slice is orthogonalised on its own (a batch axis of the
          `MuonDimensionNumbers`).
  adamw   embeddings and the output head (any `vocab` axis, or a key named
          `embedding`), norm scales, biases, sinks, router biases: every parameter
          of rank < 2, and the taps of a depthwise conv (`conv_weight` [width,
          channels] of Mamba-2 layers: not a linear map of the channels). AdamW
          decays only rank >= 2 parameters (nanoGPT's rule).
  frozen  non-`nnx.Param` variables (batch stats, the aux-loss-free router bias that a
          rule updates, caches): never changed by the optimizer.

The decision is a function of the path, the shape and the logical axis names that our
layers attach as `out_sharding` metadata (arch/common.py). Linear kernels are laid out
[*in_axes, *out_axes]; the reduction (input) axes of a >2-D kernel are found where the
head axes (`heads`, `kv_heads`, `head_dim`) start or end, e.g.

  q  [embed | heads, head_dim]      -> reduction embed, output (heads, head_dim)
  o  [heads, head_dim | embed]      -> reduction (heads, head_dim), output embed
  w_up [expert || embed | mlp]      -> batch expert, reduction embed, output mlp

Example:

    from flax import nnx
    from arch.mlp import MLP
    from configs.base import model_defaults
    specs = label_params(nnx.state(MLP(model_defaults(), rngs=nnx.Rngs(0)), nnx.Param))
    print(param_table(specs))
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import optax
from flax import nnx
from optax.contrib import MuonDimensionNumbers

MUON, ADAMW, FROZEN = "muon", "adamw", "frozen"
GROUPS = (MUON, ADAMW, FROZEN)
BATCH_AXES = ("layers", "expert")         # leading axes that stack independent matrices
HEAD_AXES = ("heads", "kv_heads", "head_dim")
PER_HEAD_AXES = ("heads", "kv_heads")     # become batch axes with `per_head=True`

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """How one parameter is optimised.

    Attributes:
      path: keys from the root of the state, e.g. ("layers", "0", "attn", "q", "kernel").
      shape: the parameter's shape.
      axes: logical axis names (None where unknown).
      group: "muon", "adamw" or "frozen".
      dims: Muon dimension numbers (muon only); all other axes are batch axes.
      reason: a few words for the startup table.
      decay: weight decay applies (matrices of Muon and AdamW alike; not vectors, not
        stacked vectors like [layers, embed], not frozen variables).
      split: (axis, sizes) of a fused Muon weight whose pieces are orthogonalised as
        separate logical matrices; their specs sit at path + ("0",), path + ("1",), ...
      piece: index of this piece of a fused weight (None for whole parameters).
    """
    path: Path
    shape: tuple[int, ...]
    axes: tuple[str | None, ...] | None
    group: str
    dims: MuonDimensionNumbers | None = None
    reason: str = ""
    decay: bool = False
    split: tuple[int, tuple[int, ...]] | None = None
    piece: int | None = None

    @property
    def name(self) -> str:
        return "/".join(self.path)

    def matrix_shape(self) -> tuple[int, int, int]:
        """(number of matrices, A, B) that Muon orthogonalises, A = reduction, B = output."""
        red, out = _as_tuple(self.dims.reduction_axis), _as_tuple(self.dims.output_axis)
        a = math.prod(self.shape[i] for i in red)
        b = math.prod(self.shape[i] for i in out)
        return math.prod(self.shape) // (a * b), a, b


def path_key(path) -> Path:
    """A jax key path as a tuple of strings, without the `.value` of an nnx.Variable."""
    keys = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            keys.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            keys.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            keys.append(k.name)
        else:
            keys.append(str(k))
    if keys and keys[-1] == "value":
        keys = keys[:-1]
    return tuple(keys)


def is_state_leaf(x) -> bool:
    """Leaves of a parameter tree: nnx.Variables (with metadata) and optax MaskedNodes."""
    return isinstance(x, (nnx.Variable, optax.MaskedNode))


def map_params(fn: Callable[[Path, Any], Any], tree):
    """Map `fn(path, leaf)` over a tree of arrays or nnx.Variables; MaskedNodes pass through.

    The result has the tree's structure with each Variable (or array) replaced by
    `fn`'s value, so it works as a label/mask prefix tree for optax on an nnx.State.
    """
    def f(path, x):
        return x if isinstance(x, optax.MaskedNode) else fn(path_key(path), x)
    return jax.tree_util.tree_map_with_path(f, tree, is_leaf=is_state_leaf)


def label_params(params, *, per_head: bool = False,
                 overrides: Mapping[str, str | MuonDimensionNumbers] | None = None,
                 fused: Mapping[str, tuple[str, Sequence[int]]] | None = None
                 ) -> dict[Path, ParamSpec]:
    """Label every parameter of `params` (an nnx.State, or a nested dict of arrays).

    Args:
      params: the parameters, ideally with their nnx.Variable wrappers (which carry
        the logical axis names and tell Params from other variables). Plain arrays
        are labelled from name and shape alone: 2-D matrices go to Muon; >2-D arrays
        then need an entry in `overrides`.
      per_head: orthogonalise each attention head's matrix separately (heads and
        kv_heads become batch axes) instead of the whole projection.
      overrides: regex (searched in the "/"-joined path) -> group name or
        `MuonDimensionNumbers` (meaning Muon with those dims). First match wins.
      fused: regex -> (logical axis name, sizes): a Muon weight that concatenates
        several logical matrices along that axis (e.g. MLA's wkv_b = [k_C | v] on
        head_dim); each piece is orthogonalised and scaled on its own. See
        `mla_fused_splits`.

    Returns:
      {path: ParamSpec} in tree order.

    Raises:
      ValueError: an override names an unknown group, or a >2-D array without axis
        names has no override.
    """
    overrides = dict(overrides or {})
    for pat, rule in overrides.items():
        if not isinstance(rule, MuonDimensionNumbers) and rule not in GROUPS:
            raise ValueError(f"overrides[{pat!r}]={rule!r} must be one of {GROUPS} "
                             "or a MuonDimensionNumbers")
    specs: dict[Path, ParamSpec] = {}

    def visit(path: Path, x):
        spec = specs[path] = _label_one(path, x, per_head, overrides)
        for pat, (axis_name, sizes) in (fused or {}).items():
            if spec.group == MUON and re.search(pat, spec.name):
                specs[path], pieces = _split(spec, axis_name, tuple(sizes))
                specs.update({p.path: p for p in pieces})
                break
        return None

    map_params(visit, params)
    return specs


def _label_one(path: Path, x, per_head: bool, overrides) -> ParamSpec:
    shape = tuple(x.shape)
    axes = None
    if isinstance(x, nnx.Variable):
        meta = x.get_metadata()
        axes = meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")
        axes = tuple(axes) if axes is not None else None
        if axes is not None and len(axes) == len(shape) - 1:
            axes = ("layers",) + axes  # stacked by nnx.scan without axis metadata
        if not isinstance(x, nnx.Param):
            return ParamSpec(path, shape, axes, FROZEN, reason=f"{type(x).__name__}, not a Param")
    spec = lambda group, dims=None, why="", decay=True: ParamSpec(
        path, shape, axes, group, dims, why, decay and _matrix_rank(shape, axes) >= 2)
    name = "/".join(path)
    for pat, rule in overrides.items():
        if re.search(pat, name):
            if isinstance(rule, MuonDimensionNumbers):
                return spec(MUON, rule, f"override {pat!r}")
            if rule == MUON:
                return spec(MUON, _muon_dims(path, shape, axes, per_head), f"override {pat!r}")
            return spec(rule, None, f"override {pat!r}")
    if path[-1] in ("bias", "scale") or _matrix_rank(shape, axes) < 2:
        return spec(ADAMW, None, "vector (norm/bias)", decay=False)
    if path[-1] == "conv_weight":
        return spec(ADAMW, None, "depthwise conv taps")
    if (axes and "vocab" in axes) or "embedding" in path or "lm_head" in path:
        return spec(ADAMW, None, "embedding/head")
    return spec(MUON, _muon_dims(path, shape, axes, per_head), "hidden matrix")


def _split(spec: ParamSpec, axis_name: str, sizes: tuple[int, ...]
           ) -> tuple[ParamSpec, list[ParamSpec]]:
    """`spec` marked as fused along `axis_name`, and the specs of its pieces."""
    if spec.axes is None or axis_name not in spec.axes:
        raise ValueError(f"fused split of {spec.name}: axis {axis_name!r} not in its axes {spec.axes}")
    axis = spec.axes.index(axis_name)
    if sum(sizes) != spec.shape[axis]:
        raise ValueError(f"fused split of {spec.name}: {sizes=} must sum to {spec.shape[axis]} "
                         f"(its {axis_name!r} axis)")
    pieces = []
    for i, n in enumerate(sizes):
        shape = spec.shape[:axis] + (n,) + spec.shape[axis + 1:]
        why = f"piece {i} of {axis_name} {'+'.join(map(str, sizes))}"
        pieces.append(dataclasses.replace(spec, path=spec.path + (str(i),), shape=shape, piece=i,
                                          reason=why))
    return dataclasses.replace(spec, split=(axis, sizes), reason="fused"), pieces


def mla_fused_splits(model_cfg) -> dict[str, tuple[str, tuple[int, ...]]]:
    """MLA's fused projections as separate logical matrices for Muon (empty without MLA).

    wkv_a [embed, kv_lora_rank + rope] = [W_DKV | W_KR] (latent and shared rotary key),
    wkv_b [kv_lora_rank, heads, nope + v] = [W_UK | W_UV] (keys and values).
    """
    mla = model_cfg.get("mla") if hasattr(model_cfg, "get") else None
    if not mla:
        return {}
    return {
        r"wkv_a/kernel$": ("latent", (mla["kv_lora_rank"], mla["qk_rope_head_dim"])),
        r"wkv_b/kernel$": ("head_dim", (mla["qk_nope_head_dim"], mla["v_head_dim"])),
    }


def _n_batch(axes) -> int:
    """Number of leading stack axes (`layers`, `expert`)."""
    n = 0
    while axes is not None and n < len(axes) and axes[n] in BATCH_AXES:
        n += 1
    return n


def _matrix_rank(shape, axes) -> int:
    """Rank without the leading stack axes: a stacked norm scale [layers, embed] has 1."""
    return len(shape) - _n_batch(axes)


def _muon_dims(path: Path, shape, axes, per_head: bool) -> MuonDimensionNumbers:
    """Reduction/output axes of a kernel laid out [*batch, *in, *out]; the rest is batch."""
    ndim = len(shape)
    name = "/".join(path)
    if axes is None:
        if ndim == 2:
            return MuonDimensionNumbers(0, 1)
        raise ValueError(f"{name}: a {ndim}-D parameter {shape} without logical axis names; "
                         "pass the nnx.State with its Param metadata or an override")
    rest = list(range(_n_batch(axes), ndim))
    if len(rest) < 2:
        raise ValueError(f"{name}: {axes} holds no matrix for Muon")
    if len(rest) == 2:
        red, out = [rest[0]], [rest[1]]
    else:
        is_head = [axes[i] in HEAD_AXES for i in rest]
        # Split where the contiguous block of head axes starts (q: embed | heads, head_dim)
        # or ends (o: heads, head_dim | embed).
        if is_head[0] and not all(is_head):
            k = is_head.index(False)
        elif any(is_head) and not all(is_head):
            k = is_head.index(True)
        else:
            raise ValueError(f"{name}: cannot tell input from output axes of {axes}; "
                             "pass an override with MuonDimensionNumbers")
        red, out = rest[:k], rest[k:]
    if per_head:
        red = [i for i in red if axes[i] not in PER_HEAD_AXES]
        out = [i for i in out if axes[i] not in PER_HEAD_AXES]
        if not red or not out:
            raise ValueError(f"{name}: per_head leaves no matrix in {axes}")
    return MuonDimensionNumbers(tuple(red), tuple(out))


def _as_tuple(x) -> tuple[int, ...]:
    return (x,) if isinstance(x, int) else tuple(x)


def group_counts(specs: Mapping[Path, ParamSpec]) -> dict[str, int]:
    """Number of parameter values per group."""
    counts = {g: 0 for g in GROUPS}
    for s in specs.values():
        if s.piece is None:  # a fused weight counts once, not again by its pieces
            counts[s.group] += math.prod(s.shape)
    return counts


def param_table(specs: Mapping[Path, ParamSpec]) -> str:
    """A fixed-width table of the labelling, for printing at startup."""
    rows = [("parameter", "shape", "axes", "group", "muon matrices", "why")]
    for s in specs.values():
        mats = ""
        if s.group == MUON and s.split is None:
            n, a, b = s.matrix_shape()
            mats = f"{n} x [{a}x{b}]"
        elif s.split is not None:
            mats = "split: " + " + ".join(str(n) for n in s.split[1])
        axes = "" if s.axes is None else ",".join(str(a) for a in s.axes)
        rows.append((s.name, "x".join(map(str, s.shape)) or "()", axes, s.group, mats, s.reason))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    counts = group_counts(specs)
    lines.append("  ".join(f"{g}: {counts[g]:,}" for g in GROUPS))
    return "\n".join(lines)


def spec_lookup(specs: Mapping[Path, ParamSpec] | None, fallback: Callable[[Any], dict]
                ) -> Callable[[Sequence[str]], ParamSpec]:
    """Return `get(tree)`: the specs if given, else labels computed from `tree` once.

    optax calls label functions on the params at `init` (nnx.Variables with metadata)
    and on pure-array updates at `update`; the first call fixes the labels.
    """
    cache: dict[Path, ParamSpec] = dict(specs) if specs is not None else {}

    def get(tree):
        if not cache:
            cache.update(fallback(tree))
        return cache
    return get
