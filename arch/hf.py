"""Load and save Hugging Face checkpoints (config.json + safetensors) as our models.

    from arch import hf
    model, cfg = hf.load("path/to/Llama-3.2-1B")          # a local directory
    logits, aux = model(tokens)
    hf.save(model, cfg, "out/")                            # config.json + model.safetensors

`load` picks the family from `config.json`'s `model_type` (llama, mistral, mixtral,
qwen2, qwen3, qwen3_moe, gemma3_text / gemma3, olmo2, deepseek_v3 / kimi_k2, gpt2,
smollm3, mamba2), translates the config (arch/hf_config.py), builds the model abstractly with
`nnx.eval_shape` (nothing allocated), then streams the checkpoint one tensor at a time
(`safetensors.safe_open(..., framework="numpy")`), reshaping each into our layout
(arch/hf_names.py) and placing it; the checkpoint is never held twice. Per-expert
tensors fill slots of our stacked `[E, ...]` expert weights.

Before reading any tensor data, `load` checks the whole checkpoint against the model:
a missing tensor, an unexpected one, or a wrong shape raises ValueError naming the
tensor; after reading, every parameter must have been filled. Nothing is returned
half-loaded.

`save` writes the inverse: the same tensor names, layouts and config fields that
transformers writes, sharded with a `model.safetensors.index.json` past
`max_shard_bytes`. save -> load is bitwise exact.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict

import jax
import jax.numpy as jnp
import ml_collections as mlc
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from arch.hf_config import fp8_block_size, from_hf, to_hf
from arch.hf_names import Entry, canonical_name, tensor_entries
from arch.model import build_model

INDEX_FILE = "model.safetensors.index.json"
# safetensors' numpy backend cannot build these dtypes; we read their bytes ourselves.
_RAW_DTYPES = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
               "F8_E5M2": ml_dtypes.float8_e5m2}


# ---------------------------------------------------------------------------- reading files


def checkpoint_files(path: str) -> dict[str, str]:
    """Tensor name -> safetensors file of a checkpoint directory (single file or sharded)."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"path={path!r} has no *.safetensors file and no {INDEX_FILE}")
    names = {}
    for file in files:
        with safe_open(os.path.join(path, file), framework="numpy") as f:
            names.update({name: os.path.join(path, file) for name in f.keys()})
    return names


def _read_raw(file: str, name: str, dtype) -> np.ndarray:
    """One tensor of a dtype numpy lacks (bf16, fp8), memory-mapped from its byte range."""
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        info = json.loads(f.read(header_len))[name]
    start, stop = info["data_offsets"]
    raw = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + header_len + start, shape=(stop - start,))
    return np.asarray(raw).view(dtype).reshape(info["shape"])


def _get(handle, file: str, name: str) -> np.ndarray:
    dt = handle.get_slice(name).get_dtype()
    return _read_raw(file, name, _RAW_DTYPES[dt]) if dt in _RAW_DTYPES else handle.get_tensor(name)


SCALE_SUFFIX = "_scale_inv"  # DeepSeek-V3 / Kimi K2 FP8: `X.weight` beside `X.weight_scale_inv`


def dequantize_fp8_blocks(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int],
                          name: str = "weight") -> np.ndarray:
    """float32 weight of an FP8 checkpoint tensor: each `block` of `weight` (E4M3) times its
    entry of `scale_inv` [ceil(rows/b0), ceil(cols/b1)] (DeepSeek-V3's weight_dequant; the
    last blocks may be partial)."""
    rows, cols = weight.shape
    want = (-(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"tensor {name + SCALE_SUFFIX!r} has shape {tuple(scale_inv.shape)}, "
                         f"expected {want} for {name!r} {weight.shape} in {block} blocks")
    scale = np.repeat(np.repeat(np.asarray(scale_inv, np.float32), block[0], 0), block[1], 1)
    return weight.astype(np.float32) * scale[:rows, :cols]


# ---------------------------------------------------------------------------- the plan


def _abstract_model(cfg):
    model = nnx.eval_shape(lambda: build_model(cfg.model, nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    return graphdef, dict(nnx.to_flat_state(state))


def _piece_shape(var, entry: Entry) -> tuple:
    shape = tuple(var.value.shape)
    return shape[1:] if entry.index is not None else shape


def _hf_shapes(entries, flat) -> dict[str, tuple]:
    """The shape every HF tensor must have, from our abstract shapes through `to_hf`."""
    shapes = {}
    for e in entries:
        var = flat[e.ours]
        piece = jax.ShapeDtypeStruct(_piece_shape(var, e), var.value.dtype)
        shape = tuple(jax.eval_shape(e.to_hf, piece).shape)
        if e.split is not None:  # the full fused tensor: pieces side by side on `axis`
            axis, _, stop = e.split
            prev = shapes.get(e.hf, shape)
            shape = shape[:axis] + (max(stop, prev[axis]),) + shape[axis + 1:]
        shapes[e.hf] = shape
    return shapes


def _check_coverage(entries, flat, family: str) -> None:
    """Every parameter of the model is filled by the mapping (a bug there, not in the file)."""
    covered = defaultdict(set)
    for e in entries:
        if e.ours not in flat:
            raise ValueError(f"HF tensor {e.hf} maps to {'/'.join(map(str, e.ours))}, "
                             "which the model does not have")
        covered[e.ours].add(e.index)
    for path, var in flat.items():
        n = var.value.shape[0] if None not in covered.get(path, {None}) else None
        want = {None} if n is None else set(range(n))
        if covered.get(path, set()) != want:
            raise ValueError(f"parameter {'/'.join(map(str, path))} has no Hugging Face tensor "
                             f"in the {family} layout")


# ---------------------------------------------------------------------------- load


def load(path: str, *, dtype=jnp.float32):
    """Load a local Hugging Face checkpoint directory as (model, cfg).

    Args:
      path: directory with config.json and *.safetensors (or a sharded index).
      dtype: parameter and compute dtype of the returned model (cfg.model.param_dtype/dtype).

    Returns:
      (model, cfg): an nnx model and the full config (configs/base.py) it was built from.

    Raises:
      ValueError: unsupported model_type / config value (naming the field), a missing,
        unexpected or wrongly shaped tensor (naming the tensor).
    """
    with open(os.path.join(path, "config.json")) as f:
        hf_cfg = json.load(f)
    dtype_name = jnp.dtype(dtype).name
    cfg = from_hf(hf_cfg, dtype_name)
    m = cfg.model
    graphdef, flat = _abstract_model(cfg)
    entries = tensor_entries(m)
    _check_coverage(entries, flat, m.family)
    by_name = defaultdict(list)
    for e in entries:
        by_name[e.hf].append(e)
    expected = _hf_shapes(entries, flat)

    # Check names and shapes of the whole checkpoint before reading any data.
    files = checkpoint_files(path)
    block = fp8_block_size(hf_cfg)
    scales = {n[:-len(SCALE_SUFFIX)]: n for n in files if block and n.endswith(SCALE_SUFFIX)}
    for weight_name, scale_name in scales.items():
        if weight_name not in files:
            raise ValueError(f"unexpected tensor {scale_name!r}: the checkpoint has no {weight_name!r}")
    canonical = {}
    for name in files:
        if name in scales.values():
            continue  # read with its weight
        c = canonical_name(name, m, hf_cfg)
        if c is None:
            continue
        if c not in by_name:
            raise ValueError(f"unexpected tensor {name!r} in the checkpoint: the {m.family} model "
                             "has no parameter for it")
        canonical[c] = name
    missing = sorted(set(by_name) - set(canonical))
    if missing:
        raise ValueError(f"missing tensor {missing[0]!r} (and {len(missing) - 1} more) in the checkpoint")
    by_file = defaultdict(list)
    for c, name in canonical.items():
        by_file[files[name]].append((c, name))
    for file, names in by_file.items():
        with safe_open(file, framework="numpy") as f:
            for c, name in names:
                shape = tuple(f.get_slice(name).get_shape())
                if shape != expected[c]:
                    raise ValueError(f"tensor {name!r} has shape {shape}, expected {expected[c]} "
                                     f"for this config.json")

    # Stream: one tensor in host memory at a time (plus stacked experts being assembled).
    values, stacks, filled = {}, {}, defaultdict(int)
    for file, names in by_file.items():
        with safe_open(file, framework="numpy") as f:
            for c, name in sorted(names):
                tensor = _get(f, file, name)
                if tensor.dtype == ml_dtypes.float8_e4m3fn:
                    if name not in scales:
                        raise ValueError(f"tensor {name!r} is FP8 but the checkpoint has no "
                                         f"{name + SCALE_SUFFIX!r} (or config.json no "
                                         "quantization_config) to dequantise it")
                    with safe_open(files[scales[name]], framework="numpy") as g:
                        scale = _get(g, files[scales[name]], scales[name])
                    tensor = dequantize_fp8_blocks(tensor, scale, block, name)
                for e in by_name[c]:
                    piece = tensor
                    if e.split is not None:
                        axis, start, stop = e.split
                        piece = np.take(tensor, np.arange(start, stop), axis=axis)
                    value = np.asarray(e.to_ours(piece))
                    target = flat[e.ours].value
                    # Parameters in the requested dtype; other state (RouterBias) keeps its own,
                    # as transformers keeps e_score_correction_bias in f32.
                    cast = dtype if isinstance(flat[e.ours], nnx.Param) else target.dtype
                    if e.index is None:
                        values[e.ours] = jnp.asarray(value, cast)
                        continue
                    if e.ours not in stacks:
                        stacks[e.ours] = np.empty(target.shape, cast)
                    stacks[e.ours][e.index] = value
                    filled[e.ours] += 1
                    if filled[e.ours] == target.shape[0]:  # all experts in: move to the device
                        values[e.ours] = jnp.asarray(stacks.pop(e.ours))
                del tensor
    unfilled = sorted(set(flat) - set(values), key=str)
    if unfilled:
        raise ValueError(f"parameter {'/'.join(map(str, unfilled[0]))} was not filled by the checkpoint")
    state = nnx.from_flat_state([(p, var.replace(value=values[p])) for p, var in flat.items()])
    return nnx.merge(graphdef, state), cfg


# ---------------------------------------------------------------------------- save


def _stored_path(flat, path, scanned: bool):
    """(key in `flat`, layer row or None): a scanned stack stores layer i as row i of one array."""
    if path in flat:
        return path, None
    if scanned and path[:2] == ("stack", "layers") and isinstance(path[2], int):
        stacked = path[:2] + path[3:]
        if stacked in flat:
            return stacked, path[2]
    if path[-1] == "router_bias":  # trained without aux-loss-free bias: HF's zero bias
        return None, None
    raise ValueError(f"the model has no parameter {'/'.join(map(str, path))} that its config implies")


def save(model, cfg, path: str, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `model` as a Hugging Face checkpoint: config.json + model*.safetensors.

    Args:
      model: an nnx model built from `cfg.model` (list or scanned layers).
      cfg: its full config (or the model config itself).
      path: output directory (created).
      max_shard_bytes: start a new shard (and write an index) past this many bytes.

    Raises:
      ValueError: the family has no HF layout, or a parameter has no HF tensor (e.g. QK-norm
        on a Llama); checked before anything is written.
    """
    m = cfg.model if "model" in cfg else cfg
    hf_cfg = to_hf(m)
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    if m.moe is not None and hf_cfg["model_type"] == "deepseek_v3" and m.moe.bias_update_rate <= 0:
        m = mlc.ConfigDict(m.to_dict())  # DeepSeek-V3 files always carry e_score_correction_bias
        m.moe.bias_update_rate = 1e-3
    by_name = defaultdict(list)
    for e in tensor_entries(m):
        by_name[e.hf].append((e, *_stored_path(flat, e.ours, m.scan_layers)))
    unused = sorted(set(flat) - {key for pieces in by_name.values() for _, key, _ in pieces}, key=str)
    if unused:
        raise ValueError(f"parameter {'/'.join(map(str, unused[0]))} has no Hugging Face tensor "
                         f"in the {hf_cfg['model_type']} layout")

    def tensor(name):  # one HF tensor from its pieces
        pieces = []
        for e, key, row in by_name[name]:
            if key is None:
                pieces.append((e, np.zeros((m.moe.num_experts,), np.float32)))
                continue
            value = np.asarray(flat[key].value)
            value = value if row is None else value[row]
            pieces.append((e, np.asarray(e.to_hf(value if e.index is None else value[e.index]))))
        if pieces[0][0].split is None:
            return np.ascontiguousarray(pieces[0][1])
        pieces.sort(key=lambda p: p[0].split[1])
        # C order: transposed (torch Linear) pieces concatenate to a Fortran-ordered array,
        # whose bytes safetensors would write as they lie in memory.
        return np.ascontiguousarray(np.concatenate([p for _, p in pieces], axis=pieces[0][0].split[0]))

    os.makedirs(path, exist_ok=True)
    shards = _plan_shards(sorted(by_name), by_name, flat, max_shard_bytes)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: tensor(name) for name in shard}  # one shard in host memory at a time
        total += sum(t.nbytes for t in tensors.values())
        save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
        del tensors
    if len(shards) > 1:
        with open(os.path.join(path, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2, sort_keys=True)


def _plan_shards(names, by_name, flat, max_bytes: int) -> list[list[str]]:
    """Group tensor names into shards of at most `max_bytes` (a larger tensor gets its own)."""
    shards, current, size = [], [], 0
    for name in names:
        nbytes = 0
        for e, key, row in by_name[name]:
            if key is None:
                continue
            var = flat[key]
            shape = var.value.shape[(row is not None) + (e.index is not None):]
            nbytes += int(np.prod(shape)) * np.dtype(var.value.dtype).itemsize
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    return shards + [current]
