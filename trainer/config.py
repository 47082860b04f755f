"""Check a whole training config before anything is computed or written.

`check_config(cfg)` runs every section's own checks (arch, data, optim, mesh) and the
cross-field ones that only the trainer knows: the sequence fits the model, the batch
splits into microbatches and over the data-parallel devices, the tokenizer fits the
vocabulary, the sample fits the context. Every failure is a ValueError that names the
field, its value and what is allowed. No model is built: shapes come from
`nnx.eval_shape`, the tokenizer from its file, and no data is read.

    >>> from configs.llama3 import get_config
    >>> cfg = get_config("tiny")
    >>> cfg.data.seq_len = 512
    >>> check_config(cfg)
    Traceback (most recent call last):
    ValueError: data.seq_len=512 must be <= model.max_seq_len=256
"""
from __future__ import annotations

import jax

import arch
import data
import optim
from arch.dropout import attention_rate
from pallas_kernels.flash_attention.api import FULL_FEATURE_IMPLS, impl_lacks
from trainer.mesh import check_parallel_config

SECTIONS = ("model", "data", "optim", "train", "mesh")


def _int_field(cfg, name: str, low: int) -> int:
    v = cfg.train[name]
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise ValueError(f"train.{name}={v!r} must be an int >= {low}")
    return v


def check_train_config(cfg) -> None:
    t = cfg.train
    _int_field(cfg, "steps", 1)
    accum = _int_field(cfg, "grad_accum", 1)
    for name in ("eval_every", "checkpoint_every", "sample_tokens"):  # 0: only at the end / off
        _int_field(cfg, name, 0)
    for name in ("eval_batches", "log_every", "keep_checkpoints", "stop_check_every"):
        _int_field(cfg, name, 1)
    if not isinstance(t.z_loss, (int, float)) or t.z_loss < 0:
        raise ValueError(f"train.z_loss={t.z_loss!r} must be a number >= 0")
    temp = t.get("sample_temperature", 0.0)
    if not isinstance(temp, (int, float)) or temp < 0:
        raise ValueError(f"train.sample_temperature={temp!r} must be a number >= 0 (0: greedy)")
    if t.sample_tokens and not t.sample_prompt:
        raise ValueError(f"train.sample_prompt={t.sample_prompt!r} must be non-empty text "
                         "when train.sample_tokens > 0 (or set sample_tokens=0)")
    if cfg.data.batch_size % accum:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} must be divisible by "
                         f"train.grad_accum={accum}")


def check_config(cfg, *, num_devices: int | None = None) -> None:
    """ValueError naming the first bad field of a training config; silent if all is well."""
    missing = [s for s in SECTIONS if s not in cfg]
    if missing:
        raise ValueError(f"config lacks sections {missing}; it needs {SECTIONS}")
    check_train_config(cfg)
    data.check_data_config(cfg.data)
    m = cfg.model
    if m.kind != "decoder" or not m.causal:
        raise ValueError(f"model.kind={m.kind!r}, model.causal={m.causal}: train.py trains "
                         "next-token prediction, which needs kind='decoder' and causal=True")
    if cfg.data.seq_len > m.max_seq_len:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} must be <= "
                         f"model.max_seq_len={m.max_seq_len}")
    tau = cfg.optim.get("qk_clip_tau")
    if tau is not None and not m.track_max_logits:
        raise ValueError(f"optim.qk_clip_tau={tau} needs model.track_max_logits=True "
                         "(QK-Clip reads the max attention logits the model reports)")
    if tau is not None and m.get("qk_norm") and m.get("mla") is None:
        raise ValueError(f"optim.qk_clip_tau={tau} cannot clip a model with model.qk_norm=True: "
                         "the norm makes the logits independent of the scale of W_q and W_k "
                         "(set optim.qk_clip_tau=None, or model.qk_norm=False)")
    d = cfg.data
    if d.get("val_source") is None and not d.get("val_fraction"):
        raise ValueError(f"data.val_fraction={d.get('val_fraction')!r} with no data.val_source "
                         "leaves no validation data, which train.py evaluates on; set "
                         "data.val_fraction in (0, 1) or a data.val_source")
    if cfg.mesh.get("sequence", 1) != 1 and attention_rate(m) > 0:
        raise ValueError(f"mesh.sequence={cfg.mesh.sequence} runs ring attention, which has "
                         "no attention dropout; set model.attention_dropout=0.0")
    # Builds the abstract model: runs every construction-time check of arch/.
    arch.count_params(m)
    lacking = impl_lacks(m.attention_impl, ["segment_ids"])
    if lacking:
        raise ValueError(f"model.attention_impl={m.attention_impl!r} (jax.nn.dot_product_attention) "
                         f"cannot take {lacking[0]}, and train.py's packed batches always carry "
                         f"them; use one of {FULL_FEATURE_IMPLS} ('auto' picks the fastest kernel "
                         "of the device)")
    optim.build_optimizer(cfg.optim, None, total_steps=cfg.train.steps)
    check_parallel_config(cfg, None if num_devices is None else jax.devices()[:num_devices])
    tok = data.make_tokenizer(cfg.data.tokenizer, field="data.tokenizer")
    if tok.vocab_size > m.vocab_size:
        raise ValueError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's "
                         f"{tok.vocab_size} tokens (data.tokenizer={cfg.data.tokenizer!r})")
    if cfg.train.sample_tokens:
        n_prompt = len(tok.encode(cfg.train.sample_prompt))
        if n_prompt + cfg.train.sample_tokens > m.max_seq_len:
            raise ValueError(f"train.sample_prompt ({n_prompt} tokens) + train.sample_tokens="
                             f"{cfg.train.sample_tokens} must be <= model.max_seq_len={m.max_seq_len}")


def check_data(cfg, ds) -> None:
    """Checks that need the data: every token id fits the model's vocabulary."""
    seen = set()  # a split source: train and validation view one token array, read it once
    for name, docs in (("data.source", ds.train), ("data.val_source", ds.val)):
        if docs is None or docs.num_tokens == 0 or id(docs.tokens) in seen:
            continue
        seen.add(id(docs.tokens))
        top = docs.max_token()
        if top >= cfg.model.vocab_size:
            src = cfg.data.source if name == "data.source" or cfg.data.get("val_source") is None \
                else cfg.data.val_source
            raise ValueError(f"{name}={src!r} holds token id {top}, but model.vocab_size="
                             f"{cfg.model.vocab_size}: ids must lie in [0, vocab_size) "
                             "(was it tokenised with another tokenizer?)")


class ConfigError(ValueError):
    """A config or its data failed a check before training started (train.py exits with it)."""
