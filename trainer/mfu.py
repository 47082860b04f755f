"""Model FLOPs utilisation: training FLOPs per token, and the peak of the device.

MFU (PaLM, Chowdhery et al. 2022, appendix B) is the share of the device's peak that
the *model's* arithmetic would use at the measured throughput; recomputation
(remat) is not counted, so MFU does not reward wasted work. Per token of training
(forward + backward = 3 x forward, 2 FLOPs per multiply-add):

    6 N                        matmuls with the weights: N = active parameters that
                               multiply activations (no input-embedding table, which
                               is a gather; the output head counts, tied or not)
    6 L c (h d_qk + h d_v)     attention scores q.k and the weighted sum of v over the
                               c keys a query sees on average: c = T for bidirectional
                               layers, T/2 causal (half the square), about W - W^2/2T
                               for a sliding window W, C/2 for chunks of C

With d_qk = d_v = d the attention term is PaLM's and nanoGPT's `12 L T h d`, halved
for causal layers (nanoGPT does not halve it: `flops_per_token(..., causal_halving=False)`).
Mamba-2 layers (arch/ssm.py) have no attention term but the SSD's (H heads of P
channels, state N, chunks of Q tokens; ~Q/2 earlier tokens of its chunk per token):

    6 H (Q/2 (N + P) + 2 P N)  C.B and the weighted sum of x in the chunk, x B^T and C S

    >>> from configs.llama3 import get_config
    >>> from trainer.mfu import flops_per_token, peak_flops
    >>> cfg = get_config("small")
    >>> f = flops_per_token(cfg.model, seq_len=4096)       # about 5.7e9 FLOPs per token
    >>> peak_flops("NVIDIA H100 80GB HBM3")               # 9.89e14 (bf16 dense)
    989000000000000.0
"""
from __future__ import annotations

import arch
from arch.attention import OTHER_KINDS, layer_kind

# Dense bf16 peak FLOP/s per chip (vendor data sheets; no 2:4 sparsity). Matched as a
# case-insensitive substring of `jax.Device.device_kind`, first hit wins: keep the
# longer names ("v5 lite") before their prefixes ("v5").
PEAK_BF16_FLOPS = (
    ("h100", 989e12),    # H100 SXM (the PCIe card is 756e12)
    ("h200", 989e12),
    ("h800", 989e12),
    ("gh200", 989e12),
    ("a100", 312e12),
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
    ("tpu v6e", 918e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),       # v5p reports itself as "TPU v5"
    ("tpu v4", 275e12),
)


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one device, None when unknown (CPU, unlisted chips)."""
    kind = device_kind.lower()
    for name, flops in PEAK_BF16_FLOPS:
        if name in kind:
            return flops
    return None


def mean_context(kind: str, seq_len: int, cfg) -> float:
    """Average number of keys one query attends to in a layer of this kind."""
    t = float(seq_len)
    if not cfg.causal:
        return t
    if kind == "local" and cfg.sliding_window and cfg.sliding_window < seq_len:
        w = float(cfg.sliding_window)
        return w - w * w / (2 * t)   # rows ramp up to w keys, then stay at w
    if kind == "chunked" and cfg.chunk_size and cfg.chunk_size < seq_len:
        return cfg.chunk_size / 2
    return t / 2


def matmul_params(cfg) -> int:
    """Active parameters that multiply activations: active minus lookup tables."""
    _, active = arch.count_params(cfg)
    if not cfg.tie_embeddings:  # the input table is a gather; a tied one is also the head
        active -= cfg.vocab_size * cfg.d_model
    if cfg.position_embedding == "learned":
        active -= cfg.max_seq_len * cfg.d_model
    return active


def attention_flops_per_token(cfg, seq_len: int, *, causal_halving: bool = True) -> float:
    """Training FLOPs per token of the attention scores and values, all layers."""
    if cfg.get("mla") is not None:
        d_qk = cfg.mla.qk_nope_head_dim + cfg.mla.qk_rope_head_dim
        d_v = cfg.mla.v_head_dim
    else:
        d_qk = d_v = cfg.head_dim
    total = 0.0
    for i in range(cfg.num_layers):
        kind = layer_kind(cfg, i)
        if kind in OTHER_KINDS:  # a Mamba-2 mixer or a feed-forward alone: no attention
            continue
        c = mean_context(kind, seq_len, cfg) if causal_halving else seq_len
        total += 6 * c * cfg.num_heads * (d_qk + d_v)
    return total


def ssd_flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token of the SSD token mixing of every Mamba-2 layer."""
    layers = sum(layer_kind(cfg, i) == "mamba" for i in range(cfg.num_layers))
    if not layers:
        return 0.0
    s = cfg.ssm
    heads, q = s.expand * cfg.d_model // s.head_dim, min(s.chunk_size, seq_len)
    return layers * 6 * heads * (q / 2 * (s.d_state + s.head_dim) + 2 * s.head_dim * s.d_state)


def flops_per_token(cfg, seq_len: int, *, causal_halving: bool = True) -> float:
    """Training (forward + backward) FLOPs per token of a model config at `seq_len`.

    Args:
      cfg: a model config (`cfg.model`).
      seq_len: tokens per row of the batch.
      causal_halving: count the causal attention square as half (False: nanoGPT).
    """
    if seq_len < 1:
        raise ValueError(f"{seq_len=} must be >= 1")
    return 6 * matmul_params(cfg) + attention_flops_per_token(
        cfg, seq_len, causal_halving=causal_halving) + ssd_flops_per_token(cfg, seq_len)


def mfu(tokens_per_second: float, flops_per_tok: float, device_kind: str,
        num_devices: int = 1) -> float | None:
    """Achieved / peak FLOP/s over `num_devices` chips; None when the peak is unknown."""
    peak = peak_flops(device_kind)
    if peak is None:
        return None
    return tokens_per_second * flops_per_tok / (peak * num_devices)


def format_mfu(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
