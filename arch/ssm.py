"""Mamba-2 layers (Dao & Gu 2024, "Transformers are SSMs", arXiv:2405.21060), for hybrids.

A Mamba-2 mixer replaces attention in the layers of kind "mamba" of `model.layer_pattern`
(Jamba, Nemotron-H: most layers Mamba, a few attention). As state-spaces/mamba's
mamba_ssm/modules/mamba2.py computes it, for an input u [B, T, D]:

    z, x, B, C, dt = in-projections of u            z, x: [B, T, H, P]; B, C: [B, T, G, N]; dt: [B, T, H]
    x, B, C = silu(causal depthwise conv1d(x, B, C))   width d_conv, over the time axis
    dt = softplus(dt + dt_bias)                      a step size per head and token
    A = -exp(A_log)                                  a scalar decay rate per head
    y = SSD(x, dt, A, B, C) + D x                    the selective state space (pallas_kernels.ssd)
    y = RMSNorm(y * silu(z))                         gated, normalised per group of heads
    out = out-projection(y)                          [B, T, D]

with H = expand * d_model / head_dim heads of P = head_dim channels, each with a state
of N = d_state per channel; G = n_groups groups of heads share B and C (GQA's K/V
sharing, §7.2 of the paper). The SSD (per head: state_t = exp(dt_t A) state_{t-1} +
dt_t x_t B_t^T, y_t = state_t C_t) runs chunked in training (`model.ssm.impl`: the
Pallas kernels, or plain jnp) and one token at a time when decoding.

Packed documents (`segment_ids`, 0 = padding): neither the conv nor the SSD carries
anything across a change of segment: the conv taps of another segment are zeroed and
the SSD state restarts (pallas_kernels/ssd/reference.py).

Decoding: with a `cache` (serving/cache.py `SSMState`: the last d_conv - 1 conv inputs
and the SSD state [B, H, P, N] of every row), new tokens continue each row's sequence:
the conv reads the cached inputs as left context, the SSD starts from the cached state
(one token: the recurrence step; several, a prefill: the chunked SSD from that state).
A row's valid tokens must come first (padding, segment id 0, at the end, as the engine
pads): padding leaves a row's state unchanged (dt = 0 there).

    import jax.numpy as jnp
    from flax import nnx
    from arch.ssm import Mamba2
    from configs.hybrid import get_config
    cfg = get_config("tiny").model
    mixer = Mamba2(cfg, rngs=nnx.Rngs(0))
    u = jnp.ones((2, 10, cfg.d_model))                     # [B, T, d_model]
    seg = jnp.array([[1] * 6 + [2] * 4, [1] * 10])          # two documents in row 0
    y, aux = mixer(u, segment_ids=seg)                      # y: [B, T, d_model]
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from arch.common import Linear, check_choice, dtype_of, logical_param, param
from pallas_kernels.ssd import IMPLS, ssd, ssd_step
from pallas_kernels.ssd.reference import seq_index

SSM_KINDS = ("mamba",)
SSM_FIELDS = ("d_state", "d_conv", "expand", "head_dim", "n_groups", "chunk_size")
# Initialisation of mamba2.py: dt ~ log-uniform in [DT_MIN, DT_MAX] (floored), A ~ U(A_INIT).
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4
A_INIT = (1.0, 16.0)
f32 = jnp.float32


def ssm_dims(cfg) -> tuple[int, int, int, int, int]:
    """(heads H, head_dim P, groups G, d_state N, conv channels) of a Mamba-2 layer."""
    s = cfg.ssm
    heads = s.expand * cfg.d_model // s.head_dim
    return heads, s.head_dim, s.n_groups, s.d_state, heads * s.head_dim + 2 * s.n_groups * s.d_state


def validate_ssm_config(cfg) -> None:
    """ValueError naming the field for anything a Mamba-2 layer cannot be built from."""
    s = cfg.get("ssm")
    if s is None:
        raise ValueError("model.layer_pattern has 'mamba' layers but model.ssm is None; set "
                         "model.ssm = configs.base.ssm_defaults() (and adjust its fields)")
    for field in SSM_FIELDS:
        value = s.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model.ssm.{field}={value!r} must be a positive int")
    check_choice("model.ssm.impl", s.get("impl"), IMPLS)
    inner = s.expand * cfg.d_model
    if inner % s.head_dim:
        raise ValueError(f"model.ssm.head_dim={s.head_dim} must divide model.ssm.expand * "
                         f"model.d_model = {s.expand} * {cfg.d_model} = {inner}")
    heads = inner // s.head_dim
    if heads % s.n_groups:
        raise ValueError(f"model.ssm.n_groups={s.n_groups} must divide the {heads} SSM heads "
                         f"(model.ssm.expand * model.d_model / model.ssm.head_dim)")
    ng = s.get("norm_groups")
    if ng is not None and (isinstance(ng, bool) or not isinstance(ng, int) or ng < 1 or heads % ng):
        raise ValueError(f"model.ssm.norm_groups={ng!r} must be None (= n_groups) or a positive "
                         f"int dividing the {heads} SSM heads")
    c = s.chunk_size
    if s.impl == "pallas_gpu" and (c < 16 or c & (c - 1)):
        raise ValueError(f"model.ssm.chunk_size={c} must be a power of two >= 16 for "
                         "model.ssm.impl='pallas_gpu'")
    if s.impl == "pallas_tpu" and c % 8:
        raise ValueError(f"model.ssm.chunk_size={c} must be a multiple of 8 (of 128 compiled "
                         "on a TPU) for model.ssm.impl='pallas_tpu'")
    if not cfg.get("causal", True):
        raise ValueError("model.causal=False (an encoder) cannot have 'mamba' layers: the SSM "
                         "recurrence reads the past only")
    if cfg.get("track_max_logits"):
        raise ValueError("model.track_max_logits=True (QK-Clip) needs attention in every layer, "
                         "but model.layer_pattern has 'mamba' layers")


# ----------------------------------------------------------------------------- pieces
def causal_conv(u, w, bias, *, seq=None, left=None):
    """Depthwise causal conv over time: out_t = bias + sum_k w[k] u_{t-K+1+k}.

    u [B, T, C], w [K, C], bias [C]; `left` [B, K-1, C] are the inputs before u (a decode
    cache; zeros by default). With `seq` [B, T] (reference.seq_index), taps from another
    segment are zero; `left` counts as token 0's segment.
    """
    b, t, c = u.shape
    k = w.shape[0]
    if left is None:
        left = jnp.zeros((b, k - 1, c), u.dtype)
    ext = jnp.concatenate([left.astype(u.dtype), u], axis=1)            # [B, K-1+T, C]
    if seq is not None:
        seq_ext = jnp.concatenate([jnp.repeat(seq[:, :1], k - 1, axis=1), seq], axis=1)
    out = jnp.zeros((b, t, c), f32)
    for i in range(k):  # tap i reads token t - (K-1-i)
        tap = ext[:, i:i + t].astype(f32)
        if seq is not None and i < k - 1:
            tap = jnp.where((seq_ext[:, i:i + t] == seq)[..., None], tap, 0.0)
        out = out + tap * w[i].astype(f32)
    return (out + bias.astype(f32)).astype(u.dtype)


def next_conv_state(u, left, num_valid):
    """The last K-1 conv inputs of each row after its `num_valid` [B] leading tokens."""
    ext = jnp.concatenate([left.astype(u.dtype), u], axis=1)            # [B, K-1+T, C]
    idx = num_valid[:, None] + jnp.arange(left.shape[1])[None, :]       # [B, K-1]
    return jnp.take_along_axis(ext, idx[..., None], axis=1).astype(left.dtype)


def gated_rms_norm(y, z, scale, *, groups: int, eps: float):
    """RMSNorm(y * silu(z)) over each group of heads (mamba2.py's norm_before_gate=False)."""
    b, t, h, p = y.shape
    g = (y.astype(f32) * jax.nn.silu(z.astype(f32))).reshape(b, t, groups, h // groups * p)
    g = g * jax.lax.rsqrt(jnp.mean(g * g, axis=-1, keepdims=True) + eps)
    return (g.reshape(b, t, h * p) * scale.astype(f32)).reshape(b, t, h, p).astype(y.dtype)


class GatedRMSNorm(nnx.Module):
    def __init__(self, dim: int, *, groups: int, eps: float):
        self.groups, self.eps = groups, eps
        self.scale = logical_param(jnp.ones((dim,), f32), (None,))  # [H * P], a vector

    def __call__(self, y, z):
        return gated_rms_norm(y, z, self.scale[...], groups=self.groups, eps=self.eps)


def _uniform(low, high):
    return lambda key, shape, dtype=f32: jax.random.uniform(key, shape, dtype, low, high)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _a_log_init(key, shape, dtype=f32):
    """log of A ~ U(A_INIT): A = -exp(A_log) in the layer."""
    return jnp.log(jax.random.uniform(key, shape, dtype, *A_INIT))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _dt_bias_init(key, shape, dtype=f32):
    """softplus^-1 of dt ~ log-uniform[DT_MIN, DT_MAX] (mamba2.py), so softplus(dt_bias) = dt."""
    u = jax.random.uniform(key, shape, f32)
    dt = jnp.maximum(jnp.exp(u * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)), DT_FLOOR)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


# ----------------------------------------------------------------------------- the layer
class Mamba2(nnx.Module):
    """The Mamba-2 mixer of one layer: [B, T, d_model] -> ([B, T, d_model], aux)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        validate_ssm_config(cfg)
        self.cfg = cfg
        s = cfg.ssm
        h, p, g, n, conv_dim = ssm_dims(cfg)
        self.dims = (h, p, g, n)
        d = cfg.d_model
        self.dtype = dtype_of(cfg.dtype)
        kw = dict(rngs=rngs, std=cfg.init_std, dtype=self.dtype, param_dtype=dtype_of(cfg.param_dtype),
                  precision=cfg.get("matmul_precision", "bf16"))  # arch/precision.py
        # In-projections (mamba2.py's one in_proj, split by role so each keeps its axes).
        self.in_z = Linear(d, (h, p), in_axes=("embed",), out_axes=("heads", "head_dim"), **kw)
        self.in_x = Linear(d, (h, p), in_axes=("embed",), out_axes=("heads", "head_dim"), **kw)
        self.in_b = Linear(d, (g, n), in_axes=("embed",), out_axes=("kv_heads", None), **kw)
        self.in_c = Linear(d, (g, n), in_axes=("embed",), out_axes=("kv_heads", None), **kw)
        self.in_dt = Linear(d, h, in_axes=("embed",), out_axes=("heads",), **kw)
        # Depthwise conv over the channels of (x, B, C); torch's Conv1d init.
        bound = s.d_conv ** -0.5
        self.conv_weight = param(rngs, (s.d_conv, conv_dim), (None, None), init=_uniform(-bound, bound))
        self.conv_bias = param(rngs, (conv_dim,), (None,), init=_uniform(-bound, bound))
        self.dt_bias = param(rngs, (h,), ("heads",), init=_dt_bias_init)
        self.A_log = param(rngs, (h,), ("heads",), init=_a_log_init)
        self.D = logical_param(jnp.ones((h,), f32), ("heads",))
        self.norm = GatedRMSNorm(h * p, groups=s.get("norm_groups") or g, eps=cfg.norm_eps)
        self.out = Linear((h, p), d, in_axes=("heads", "head_dim"), out_axes=("embed",), **kw)

    def __call__(self, u, *, positions=None, segment_ids=None, cache=None):
        del positions  # an SSM needs no positions: order is in the recurrence
        if cache is not None and not hasattr(cache, "ssm"):
            raise ValueError(f"cache must be None or an SSMState of serving/cache.py, got {type(cache)}")
        s = self.cfg.ssm
        h, p, g, n = self.dims
        b, t, _ = u.shape
        z = self.in_z(u)                                                     # [B, T, H, P]
        xbc = jnp.concatenate([self.in_x(u).reshape(b, t, h * p), self.in_b(u).reshape(b, t, g * n),
                               self.in_c(u).reshape(b, t, g * n)], axis=-1)  # [B, T, H*P + 2*G*N]
        w = self.conv_weight[...].astype(self.dtype)
        if cache is None:
            seq = None if segment_ids is None else seq_index(segment_ids, b, t)
            conv = causal_conv(xbc, w, self.conv_bias[...], seq=seq)
        else:
            conv = causal_conv(xbc, w, self.conv_bias[...], left=cache.conv)
        conv = jax.nn.silu(conv)
        x = conv[..., :h * p].reshape(b, t, h, p)
        B = conv[..., h * p:h * p + g * n].reshape(b, t, g, n)
        C = conv[..., h * p + g * n:].reshape(b, t, g, n)
        dt = jax.nn.softplus(self.in_dt(u).astype(f32) + self.dt_bias[...])  # [B, T, H]
        A = -jnp.exp(self.A_log[...].astype(f32))                            # [H]
        D = self.D[...]
        aux = {}
        if cache is None:
            y = ssd(x, dt, A, B, C, D=D, chunk_size=s.chunk_size, segment_ids=segment_ids,
                    impl=s.impl)
        else:
            valid = jnp.ones((b, t), bool) if segment_ids is None else segment_ids != 0
            dt = jnp.where(valid[..., None], dt, 0.0)  # padding: the state passes unchanged
            if t == 1:  # decoding: one step of the recurrence
                y, state = ssd_step(cache.ssm, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D=D)
                y = y[:, None]
            else:       # prefill: the chunked SSD from the cached state
                y, state = ssd(x, dt, A, B, C, D=D, chunk_size=s.chunk_size,
                               initial_state=cache.ssm, return_final_state=True, impl=s.impl)
            num_valid = valid.sum(axis=1, dtype=jnp.int32)
            aux["cache"] = cache.replace(conv=next_conv_state(xbc, cache.conv, num_valid),
                                         ssm=state.astype(cache.ssm.dtype),
                                         lengths=cache.lengths + num_valid)
        y = self.norm(y, z)
        return self.out(y), aux
