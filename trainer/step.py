"""The loss, the train step (with gradient accumulation) and the eval step.

Loss over the N tokens whose `loss_mask` is 1 (f32 whatever the compute dtype):

    ce      = (1/N) sum_t  lse_t - logits_t[target_t],    lse_t = logsumexp(logits_t)
    z_loss  = z * (1/N) sum_t  lse_t^2                     (PaLM, Chowdhery et al. 2022, sec. 5:
                                                            keeps the softmax normaliser near 1)
    loss    = ce + z_loss + moe_aux_loss + moe_z_loss      (the MoE terms arrive from the model
                                                            already scaled by their coefficients)

Gradient accumulation: the batch is split into `grad_accum` microbatches; each adds
its token sums divided by the N of the *whole* batch, so the accumulated gradient of
ce and z_loss is the big batch's, exactly (up to f32 summation order). The MoE terms
are batch statistics (load fractions), not sums over tokens; they are averaged over
microbatches, as Megatron and MaxText do.

Dropout (arch/dropout.py) is on in `train_step` only: it runs a view of the model with
dropout on, threads the dropout RNG streams through the microbatches and writes their
advanced counts back into the model, so the next step (or a resumed run) draws fresh
masks. `eval_step` runs with dropout off, whatever mode the model is in.

After the optimizer update, inside the same compiled step:
  QK-Clip (optim.qk_clip) when `optim.qk_clip_tau` is set, from the batch's max logits;
  the aux-loss-free router-bias update (arch.moe) when `moe.bias_update_rate > 0`.

    >>> from trainer.step import StepOptions, train_step, eval_step
    >>> opts = StepOptions.from_config(cfg)
    >>> metrics = train_step(model, optimizer, batch, opts=opts)   # updates both in place
    >>> sums = eval_step(model, batch)                             # {"ce_sum", "tokens"}
    >>> step = bind_train_step(model, optimizer)                   # the same, for a loop:
    >>> metrics = step(batch, opts=opts)                           # no per-call graph walk

Why bind: `nnx.jit` walks the model and optimizer graphs in Python on every call, to
split them into arrays and back. For nanoGPT's 10M-parameter baby GPT that walk took
longer than the GPU step (about 11 ms per call on a 2-core host against a 3 ms compiled
step), so train.py ran at the host's pace. `nnx.cached_partial` walks the graph once and
afterwards only swaps the arrays; the objects are still updated in place.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from arch.dropout import with_dropout
from arch.moe import update_router_biases
from optim import qk_clip


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """What the compiled step needs from the config (hashable: a static jit argument)."""

    z_loss: float = 0.0
    grad_accum: int = 1
    qk_clip_tau: float | None = None
    qk_nope_head_dim: int | None = None   # MLA only, for QK-Clip
    router_bias_update: bool = False

    @classmethod
    def from_config(cls, cfg) -> "StepOptions":
        m = cfg.model
        mla, moe = m.get("mla"), m.get("moe")
        return cls(
            z_loss=float(cfg.train.z_loss),
            grad_accum=int(cfg.train.grad_accum),
            qk_clip_tau=None if cfg.optim.get("qk_clip_tau") is None else float(cfg.optim.qk_clip_tau),
            qk_nope_head_dim=None if mla is None else int(mla.qk_nope_head_dim),
            router_bias_update=moe is not None and float(moe.bias_update_rate) > 0)


def token_loss_sums(logits, targets, loss_mask) -> dict[str, jax.Array]:
    """Masked sums of the per-token cross-entropy and squared log-normaliser.

    Args:
      logits: [B, T, V] (cast to f32).
      targets: [B, T] int token ids.
      loss_mask: [B, T], 1 where the token counts.

    Returns:
      dict(ce_sum, z_sum, tokens): f32 scalars, sum over counted tokens of
      lse - logit[target], of lse^2, and the number of counted tokens.
    """
    logits = logits.astype(jnp.float32)
    mask = loss_mask.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)                                   # [B, T]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, T]
    return {"ce_sum": jnp.sum(mask * (lse - target_logit)),
            "z_sum": jnp.sum(mask * lse ** 2),
            "tokens": jnp.sum(mask)}


def forward(model, batch):
    """Logits and aux of `model` on a batch; without "segment_ids" every row is one
    document (plain causal masking, which lets attention kernels skip the mask loads)."""
    return model(batch["tokens"], positions=batch["positions"], segment_ids=batch.get("segment_ids"))


def split_microbatches(batch: dict, n: int) -> dict:
    """[B, ...] -> [n, B/n, ...], microbatch i = rows i, i+n, i+2n, ...

    Strided rather than contiguous: with B split over devices in contiguous blocks,
    every microbatch then takes B/n/devices rows of each device's block, so no
    microbatch has to move between devices.
    """
    def split(x):
        b = x.shape[0]
        return x.reshape(b // n, n, *x.shape[1:]).swapaxes(0, 1)  # [n, B/n, ...]
    return jax.tree.map(split, batch)


def _expert_loads(layer_aux) -> jax.Array | None:
    """Per-MoE-layer expert loads [num_moe_layers, E] from the model's aux["layers"]."""
    if isinstance(layer_aux, dict):  # scanned layers: arrays stacked over layers
        return layer_aux.get("expert_load")
    loads = [a["expert_load"] for a in layer_aux if "expert_load" in a]
    return jnp.stack(loads) if loads else None


@nnx.jit(static_argnames=("opts",), donate_argnames=("model", "optimizer"))
def train_step(model, optimizer, batch: dict, *, opts: StepOptions) -> dict[str, jax.Array]:
    """One optimizer step on `batch`; updates `model` and `optimizer` in place.

    Returns f32 scalars: loss (total), ce, z_loss, moe_aux_loss, moe_z_loss, grad_norm,
    tokens (counted tokens), and max_logit when the model reports max attention logits.
    """
    graphdef, params, rngs, rest = nnx.split(with_dropout(model, True), nnx.Param,
                                             nnx.RngState, ...)
    n_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    accum = opts.grad_accum

    def loss_fn(p, rng, r, mb):
        # Merge into fresh Variables (copy=True): reusing the outer ones (e.g. the MoE
        # router biases, traced by jit, not by grad) makes nnx.scan refuse a module whose
        # variables come from different trace levels.
        m = nnx.merge(graphdef, p, rng, r, copy=True)
        logits, aux = forward(m, mb)
        s = token_loss_sums(logits, mb["targets"], mb["loss_mask"])
        moe = (aux["moe_aux_loss"] + aux["moe_z_loss"]) / accum
        loss = (s["ce_sum"] + opts.z_loss * s["z_sum"]) / n_tokens + moe
        out = {"ce": s["ce_sum"] / n_tokens, "z_loss": opts.z_loss * s["z_sum"] / n_tokens,
               "moe_aux_loss": aux["moe_aux_loss"] / accum, "moe_z_loss": aux["moe_z_loss"] / accum}
        if "max_logits" in aux:
            out["max_logits"] = aux["max_logits"]
        loads = _expert_loads(aux["layers"])
        if loads is not None:
            out["expert_load"] = loads
        return loss, (out, nnx.state(m, nnx.RngState))  # the streams, advanced by dropout

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
        (loss, (stats, rngs)), grads = grad_fn(params, rngs, rest, batch)
    else:
        micro = split_microbatches(batch, accum)

        def body(carry, mb):
            lc, sc, gc, rng = carry
            (l, (s, rng)), g = grad_fn(params, rng, rest, mb)
            merged = {k: jnp.maximum(sc[k], s[k]) if k == "max_logits" else sc[k] + s[k] for k in s}
            return (lc + l, merged, jax.tree.map(jnp.add, gc, g), rng), None

        # Zero carry shaped like one microbatch's output (max_logits starts at -inf).
        shapes = jax.eval_shape(grad_fn, params, rngs, rest, jax.tree.map(lambda x: x[0], micro))
        (_, (stats0, _)), grads0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        if "max_logits" in stats0:
            stats0["max_logits"] = jnp.full_like(stats0["max_logits"], -jnp.inf)
        init = (jnp.zeros((), jnp.float32), stats0, grads0, rngs)
        (loss, stats, grads, rngs), _ = jax.lax.scan(body, init, micro)

    nnx.update(model, rngs)
    optimizer.update(model, grads)
    if opts.qk_clip_tau is not None:
        new = qk_clip(nnx.state(model, nnx.Param), stats["max_logits"], tau=opts.qk_clip_tau,
                      qk_nope_head_dim=opts.qk_nope_head_dim)
        nnx.update(model, new)
    if opts.router_bias_update and "expert_load" in stats:
        update_router_biases(model, {"expert_load": stats["expert_load"]})

    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "tokens": n_tokens,
               **{k: stats[k] for k in ("ce", "z_loss", "moe_aux_loss", "moe_z_loss")}}
    if "max_logits" in stats:
        metrics["max_logit"] = jnp.max(stats["max_logits"])
    return metrics


@nnx.jit
def eval_step(model, batch: dict) -> dict[str, jax.Array]:
    """Masked sums over one batch: ce_sum (nats) and tokens, to be summed over batches."""
    logits, _ = forward(with_dropout(model, False), batch)
    s = token_loss_sums(logits, batch["targets"], batch["loss_mask"])
    return {"ce_sum": s["ce_sum"], "tokens": s["tokens"]}


def bind_train_step(model, optimizer):
    """`train_step` with `model` and `optimizer` bound: `step(batch, opts=opts)`.

    The same compiled step and the same in-place updates, without walking the graphs on
    every call (see the module docstring). Bind after the last structural change (a
    restore with `nnx.update` only swaps values and is fine before or after).
    """
    return nnx.cached_partial(train_step, model, optimizer)


def bind_eval_step(model):
    """`eval_step` with `model` bound: `step(batch)`, for a pass over many batches."""
    return nnx.cached_partial(eval_step, model)
