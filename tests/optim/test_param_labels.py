"""Parameter labelling: exactly the expected parameters in each group, with the right matrices."""
import math

import chex
import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from optax.contrib import MuonDimensionNumbers as DN

from arch.common import Linear, logical_param, param
from arch.model import build_model
from arch.norms import RMSNorm
from configs.base import get_base_config, mla_defaults, model_defaults, moe_defaults
from optim import build_optimizer, label_params, mla_fused_splits, param_table


class RouterBias(nnx.Variable):
    """A non-Param variable (aux-loss-free balancing bias): never optimised."""


class TinyBlock(nnx.Module):
    """Attention + MoE-style parameters with the layouts of arch/ (written here on purpose)."""

    def __init__(self, rngs, d=16, h=4, kv=2, hd=8, e=3, f=24):
        self.q = Linear(d, (h, hd), in_axes=("embed",), out_axes=("heads", "head_dim"), rngs=rngs, use_bias=True)
        self.k = Linear(d, (kv, hd), in_axes=("embed",), out_axes=("kv_heads", "head_dim"), rngs=rngs)
        self.o = Linear((h, hd), d, in_axes=("heads", "head_dim"), out_axes=("embed",), rngs=rngs)
        self.up = Linear(d, f, in_axes=("embed",), out_axes=("mlp",), rngs=rngs)
        self.w_down = param(rngs, (e, f, d), ("expert", "mlp", "embed"))
        self.router = Linear(d, e, in_axes=("embed",), out_axes=("expert",), rngs=rngs)
        self.router_bias = logical_param(jnp.zeros((e,)), ("expert",), cls=RouterBias)
        self.norm = RMSNorm(d)


class TinyModel(nnx.Module):
    def __init__(self, rngs, d=16, vocab=32):
        self.embed = nnx.Module()
        self.embed.embedding = param(rngs, (vocab, d), ("vocab", "embed"))
        self.layers = nnx.List([TinyBlock(rngs) for _ in range(2)])
        self.stacked = logical_param(jnp.zeros((2, d, 24)), ("layers", "embed", "mlp"))
        self.stacked_scale = logical_param(jnp.ones((2, d)), ("layers", "embed"))
        self.lm_head = Linear(d, vocab, in_axes=("embed",), out_axes=("vocab",), rngs=rngs)


def groups(specs):
    out = {}
    for s in specs.values():
        out.setdefault(s.group, set()).add(s.name)
    return out


def test_tiny_model_groups_and_dims():
    specs = label_params(nnx.state(nnx.eval_shape(lambda: TinyModel(nnx.Rngs(0)))))
    per_layer = lambda names: {f"layers/{i}/{n}" for i in range(2) for n in names}
    assert groups(specs) == {
        "muon": per_layer(["q/kernel", "k/kernel", "o/kernel", "up/kernel", "w_down", "router/kernel"])
        | {"stacked"},
        "adamw": per_layer(["q/bias", "norm/scale"]) | {"embed/embedding", "lm_head/kernel", "stacked_scale"},
        "frozen": per_layer(["router_bias"]),
    }
    get = lambda name: specs[tuple(name.split("/"))]
    # q [embed | heads, head_dim]: one [16 x 32] matrix; o [heads, head_dim | embed].
    assert get("layers/0/q/kernel").dims == DN((0,), (1, 2))
    assert get("layers/0/o/kernel").dims == DN((0, 1), (2,))
    assert get("layers/0/k/kernel").matrix_shape() == (1, 16, 16)
    # Stacked experts / layers: leading axis is a batch of matrices.
    assert get("layers/0/w_down").dims == DN((1,), (2,))
    assert get("layers/0/w_down").matrix_shape() == (3, 24, 16)
    assert get("stacked").matrix_shape() == (2, 16, 24)
    # Router [embed, expert]: "expert" is an output axis here, not a stack axis.
    assert get("layers/0/router/kernel").dims == DN((0,), (1,))
    # Weight decay: matrices only.
    assert get("embed/embedding").decay and get("layers/0/q/kernel").decay
    assert not get("layers/0/q/bias").decay and not get("stacked_scale").decay
    assert not get("layers/0/router_bias").decay


def test_per_head_dims():
    specs = label_params(nnx.state(nnx.eval_shape(lambda: TinyModel(nnx.Rngs(0)))), per_head=True)
    q, o = specs[("layers", "0", "q", "kernel")], specs[("layers", "0", "o", "kernel")]
    assert q.dims == DN((0,), (2,)) and q.matrix_shape() == (4, 16, 8)
    assert o.dims == DN((1,), (2,)) and o.matrix_shape() == (4, 8, 16)


def test_table_lists_every_parameter():
    specs = label_params(nnx.state(nnx.eval_shape(lambda: TinyModel(nnx.Rngs(0)))))
    table = param_table(specs)
    lines = table.splitlines()
    assert len(lines) == len(specs) + 3  # header, rule, one per parameter, totals
    row = next(line for line in lines if line.startswith("layers/0/w_down "))
    assert "3 x [24x16]" in row and "muon" in row
    n_adamw = sum(math.prod(s.shape) for s in specs.values() if s.group == "adamw")
    assert f"adamw: {n_adamw:,}" in lines[-1]


def test_overrides_and_errors():
    state = nnx.state(nnx.eval_shape(lambda: TinyModel(nnx.Rngs(0))))
    specs = label_params(state, overrides={r"router/kernel$": "adamw", r"^stacked$": DN((2,), (1,))})
    assert specs[("layers", "0", "router", "kernel")].group == "adamw"
    assert specs[("stacked",)].dims == DN((2,), (1,))
    with pytest.raises(ValueError, match="overrides"):
        label_params(state, overrides={"q": "sgd"})
    # A 3-D array without axis names cannot be labelled from its shape.
    with pytest.raises(ValueError, match="logical axis names"):
        label_params({"w": jnp.zeros((2, 3, 4))})
    with pytest.raises(ValueError, match="sizes"):
        label_params(state, fused={r"up/kernel$": ("mlp", (10, 10))})


def _tiny(**kw):
    cfg = model_defaults()
    cfg.update(kw)
    return cfg


@pytest.mark.parametrize("scan", [False, True])
def test_real_llama_model(scan):
    cfg = _tiny(num_layers=2, scan_layers=scan)
    model = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))
    specs = label_params(nnx.state(model, nnx.Param))
    g = groups(specs)
    assert g["adamw"] >= {"embed/embedding", "lm_head/kernel", "final_norm/scale"}
    assert all(n.endswith("scale") for n in g["adamw"] - {"embed/embedding", "lm_head/kernel"})
    kernels = {"attn/q/kernel", "attn/k/kernel", "attn/v/kernel", "attn/o/kernel",
               "mlp/up/kernel", "mlp/gate/kernel", "mlp/down/kernel"}
    layers = ["stack/layers"] if scan else [f"stack/layers/{i}" for i in range(2)]
    assert g["muon"] == {f"{lay}/{k}" for lay in layers for k in kernels}
    q = specs[tuple(f"{layers[0]}/attn/q/kernel".split("/"))]
    assert q.matrix_shape() == (2 if scan else 1, cfg.d_model, cfg.num_heads * cfg.head_dim)


def test_real_deepseek_style_model():
    cfg = _tiny(num_layers=2, mla=mla_defaults(), moe=moe_defaults())
    cfg.mla.q_lora_rank = 24
    cfg.moe.update(first_k_dense=1, num_shared_experts=1, bias_update_rate=0.01)
    model = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))
    specs = label_params(nnx.state(model), fused=mla_fused_splits(cfg))
    g = groups(specs)
    assert g["frozen"] == {"stack/layers/1/mlp/router_bias"}
    for n in ("wq_a", "wq_b", "wkv_a", "wkv_b", "wo"):
        assert f"stack/layers/0/attn/{n}/kernel" in g["muon"]
    assert {"stack/layers/0/attn/q_norm/scale", "stack/layers/0/attn/kv_norm/scale"} <= g["adamw"]
    experts = specs[("stack", "layers", "1", "mlp", "w_up")]
    assert experts.matrix_shape() == (8, cfg.d_model, cfg.moe.expert_mlp_dim)
    # Fused MLA projections: [W_DKV | W_KR] and [W_UK | W_UV] are separate matrices.
    wkv_a = ("stack", "layers", "0", "attn", "wkv_a", "kernel")
    assert specs[wkv_a].split == (1, (32, 8))
    assert specs[wkv_a + ("1",)].matrix_shape() == (1, cfg.d_model, 8)
    wkv_b = ("stack", "layers", "0", "attn", "wkv_b", "kernel")
    assert specs[wkv_b + ("0",)].matrix_shape() == (1, 32, cfg.num_heads * 16)


def test_fused_split_equals_separate_pieces():
    """A fused [16, 4, 8+8] weight split on head_dim = two separately optimised params."""
    fused = nnx.State({"w": logical_param(jnp.zeros((16, 4, 16)), ("latent", "heads", "head_dim"))})
    apart = nnx.State({f"w{i}": logical_param(jnp.zeros((16, 4, 8)), ("latent", "heads", "head_dim"))
                       for i in range(2)})
    cfg = get_base_config().optim
    cfg.update(name="moonlight", schedule="constant", warmup_steps=0, grad_clip=None)
    tx_f = build_optimizer(cfg, fused, fused={"^w$": ("head_dim", (8, 8))})
    tx_a = build_optimizer(cfg, apart)
    sf, sa = tx_f.init(fused), tx_a.init(apart)
    pf, pa = nnx.as_pure(fused), nnx.as_pure(apart)
    for i in range(2):
        g = jax.random.normal(jax.random.key(i), (16, 4, 16))
        uf, sf = jax.jit(tx_f.update)(nnx.State({"w": g}), sf, pf)
        ua, sa = jax.jit(tx_a.update)(nnx.State({"w0": g[..., :8], "w1": g[..., 8:]}), sa, pa)
        pf = jax.tree.map(jnp.add, pf, uf)
        pa = jax.tree.map(jnp.add, pa, ua)
    chex.assert_trees_all_close(pf["w"], jnp.concatenate([pa["w0"], pa["w1"]], -1), atol=1e-6)
    # And it differs from orthogonalising the fused matrix whole.
    tx_w = build_optimizer(cfg, fused)
    uw, _ = jax.jit(tx_w.update)(nnx.State({"w": g}), tx_w.init(fused), nnx.as_pure(fused))
    uf1, _ = jax.jit(tx_f.update)(nnx.State({"w": g}), tx_f.init(fused), nnx.as_pure(fused))
    assert not jnp.allclose(uw["w"], uf1["w"], atol=1e-4)
