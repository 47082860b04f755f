"""Paged decode attention in Pallas for NVIDIA GPUs (Triton lowering), split-K over pages.

Decode reads every cached key and value once per step and does ~2 FLOPs per byte, so
the kernel is designed for memory bandwidth, after Flash-Decoding (Dao et al., 2023,
https://crfm.stanford.edu/2023/10/12/flashdecoding.html) and PagedAttention
(Kwon et al., 2023, https://arxiv.org/abs/2309.06180):

  * one program per (sequence, kv head, split): the G = H / kv_heads query heads that
    share a kv head form the M dimension of both dots, so each K/V page is read once
    for the whole group (never repeated per query head); G is zero-padded to a power
    of two >= 16, the smallest M a tensor-core dot takes;
  * each loop step gathers `pages_per_block` pages (one block of keys) through the
    page table and runs an online softmax over it (FlashAttention);
  * split-K: the pages of a sequence are cut into `num_splits` contiguous ranges
    handled by different programs, so that batch * kv_heads * splits programs fill
    the GPU even at small batch and long context; each split writes its normalised
    partial output and log-sum-exp, and `merge_splits` combines them exactly;
  * a program loops only over the blocks that hold visible keys (below `lengths[b]`,
    and within the sliding window), so short sequences in a long table cost little.

On CPU `interpret=True` runs the same kernel (slowly) for tests. On a Hopper GPU the
eligible calls (bf16/f16, no soft-cap) go to gpu_hopper.py's Mosaic GPU kernel instead,
same split-K layout, with TMA page copies and warp specialisation (`BlockSizes.kernel`).

    >>> import jax, jax.numpy as jnp
    >>> q = jnp.ones((1, 4, 16)); kp = vp = jnp.ones((2, 4, 8, 16))
    >>> o = paged_attention_gpu(q, kp, vp, jnp.array([13], jnp.int32),
    ...                         jnp.array([[3, 1]], jnp.int32), interpret=True)
    >>> o.shape
    (1, 4, 16)
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash_attention.gpu import is_hopper
from pallas_kernels.paged_attention import gpu_hopper

KERNELS = ("auto", "triton", "hopper")
_MIN_DOT_M = 16  # tensor-core dots in Triton need M >= 16
# ... and K >= 16 with 16-bit inputs (the m16n8k16 MMA): the P @ V dot contracts over the
# block of keys. Blocks of 16-bit keys are raised to 16: a compiled H200 run of a bf16
# case with blocks of 8 keys exceeded the tolerance (it passes in interpret mode), and
# passes with this (bench/results/decode.md).
_MIN_DOT_K_16BIT = 16
_H100_SMS = 132


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the GPU kernel.

    Attributes:
      pages_per_block: pages gathered per loop step (block of keys =
        pages_per_block * page_size); the block must be a power of two.
      num_splits: split-K factor over the page table (None: chosen from the shapes so
        that the grid fills the GPU).
      num_warps, num_stages: Triton launch parameters (software pipelining depth).
      kernel: "auto" (gpu_hopper.py's Mosaic GPU kernel when the call runs compiled on a
        Hopper GPU and is one it covers, else the Triton kernel of this file),
        "triton", or "hopper" (gpu_hopper.py or a ValueError saying why not).
      hopper: tiles of the Hopper kernel (None: its defaults); the fields above are the
        Triton kernel's.
    """

    pages_per_block: int = 4
    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 3
    kernel: str = "auto"
    hopper: gpu_hopper.HopperPagedBlocks | None = None

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"BlockSizes.kernel={self.kernel!r} must be one of {KERNELS}")
        if not _is_pow2(self.pages_per_block):
            raise ValueError(f"{self.pages_per_block=} must be a power of two")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"{self.num_splits=} must be >= 1 or None")

    @classmethod
    def get_default(cls, *, page_size: int, head_dim: int, max_pages: int) -> "BlockSizes":
        """~8K elements per K block (64 keys at D=128): K+V of two pipeline stages fit
        three programs per H100 SM in shared memory, enough bytes in flight per SM.
        Never more pages per block than the (power-of-two rounded) table holds."""
        ppb = max(1, (8192 // head_dim) // page_size)
        ppb = min(1 << (ppb.bit_length() - 1), _next_pow2(max_pages))  # power of two
        return cls(pages_per_block=ppb)


MIN_SPLITS = 8


def default_num_splits(batch: int, kv_heads: int, num_blocks: int, num_sms: int) -> int:
    """At least MIN_SPLITS splits, more if needed for ~4 programs per SM, but at least
    4 blocks of keys per split.

    More splits than the grid needs still pay: on an H100 (bf16, 8k context, GQA 8:1)
    8 splits reached 71% / 81% / 89% of copy bandwidth at batch 8 / 32 / 128, against
    69% / 68% / 83% when splitting only to fill the SMs (9 / 3 / 1 splits): each
    sequence's keys stream through more SMs at once (bench/results/decode.md)."""
    want = max(MIN_SPLITS, pl.cdiv(4 * num_sms, batch * kv_heads))
    return max(1, min(want, pl.cdiv(num_blocks, 4)))


def _num_sms() -> int:
    dev = jax.devices()[0]
    return getattr(dev, "core_count", None) or _H100_SMS


def _kernel(
    len_ref,  # [1] int32: keys of this sequence
    pt_ref,  # [pages_per_split] int32: this split's slice of the page table
    q_ref,  # [Gp, D]
    k_ref,  # [num_pages, page_size, D]: the pool of this kv head
    v_ref,  # [num_pages, page_size, D]
    o_ref,  # [Gp, D] f32: normalised output of this split
    lse_ref,  # [Gp] f32: log-sum-exp of this split (-inf when it saw no key)
    *,
    sm_scale: float,
    logit_soft_cap: float | None,
    sliding_window: int | None,
    pages_per_block: int,
    precision,
):
    split = pl.program_id(2)
    page_size = k_ref.shape[1]
    pages_per_split = pt_ref.shape[0]
    block_k = pages_per_block * page_size
    gp, d = q_ref.shape
    length = len_ref[0]

    # Pages [lo, hi) of the sequence hold visible keys; clip to this split's range and
    # align the start down to a block so every table slice stays inside the split.
    split_lo = split * pages_per_split
    hi = jnp.minimum(split_lo + pages_per_split, pl.cdiv(length, page_size))
    lo = split_lo
    if sliding_window is not None:
        first = jnp.maximum(length - sliding_window, 0) // page_size
        lo = jnp.maximum(lo, split_lo + (first - split_lo) // pages_per_block * pages_per_block)
    num_blocks = pl.cdiv(jnp.maximum(hi - lo, 0), pages_per_block)

    q = q_ref[...]

    def body(j, carry):
        acc, m, l = carry  # [Gp, D], [Gp], [Gp] f32
        first_page = lo + j * pages_per_block
        pages = pt_ref[pl.ds(first_page - split_lo, pages_per_block)]  # [ppb]
        k = k_ref[pages].reshape(block_k, d)  # gather ppb pages -> [block_k, D]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32) * sm_scale  # [Gp, block_k]
        if logit_soft_cap is not None:
            s = logit_soft_cap * jnp.tanh(s / logit_soft_cap)
        pos = first_page * page_size + lax.broadcasted_iota(jnp.int32, (gp, block_k), 1)
        mask = pos < length
        if sliding_window is not None:
            mask &= pos >= length - sliding_window
        s = jnp.where(mask, s, -jnp.inf)
        # Every visited block holds a visible key, so m_new is finite; guard anyway.
        m_new = jnp.maximum(m, s.max(axis=1))
        m_new = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l = alpha * l + p.sum(axis=1)
        v = v_ref[pages].reshape(block_k, d)
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             precision=precision, preferred_element_type=jnp.float32)
        return acc * alpha[:, None] + pv, m_new, l

    acc = jnp.zeros((gp, d), jnp.float32)
    m = jnp.full((gp,), -jnp.inf, jnp.float32)
    l = jnp.zeros((gp,), jnp.float32)
    acc, m, l = lax.fori_loop(0, num_blocks, body, (acc, m, l))
    seen = l > 0
    o_ref[...] = acc / jnp.where(seen, l, 1.0)[:, None]
    lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


def merge_splits(o, lse):
    """Combine per-split normalised outputs by their log-sum-exp (exact).

    Args:
      o: [S, ..., D] f32 outputs of S splits over disjoint key sets.
      lse: [S, ...] their log-sum-exps, -inf where a split saw no key.
    Returns:
      ([..., D] output, 0 where no split saw a key; [...] total log-sum-exp).
    """
    m = lse.max(axis=0)
    m_safe = jnp.where(m == -jnp.inf, 0.0, m)
    w = jnp.exp(lse - m_safe)  # [S, ...]; 0 for empty splits
    total = w.sum(axis=0)
    out = (w[..., None] * o).sum(axis=0) / jnp.where(total > 0, total, 1.0)[..., None]
    return out, jnp.where(total > 0, m_safe + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)


def check_supported(q, k_pages) -> None:
    """Raise NotImplementedError for shapes the Triton lowering cannot tile."""
    page_size, d = k_pages.shape[2], k_pages.shape[3]
    if not _is_pow2(d):
        raise NotImplementedError(f"head_dim={d} must be a power of two for the Triton kernel")
    if not _is_pow2(page_size):
        raise NotImplementedError(f"{page_size=} must be a power of two for the Triton kernel")
    del q


def _hopper_tiles(q, k_pages, block_sizes: BlockSizes, interpret: bool, logit_soft_cap):
    """Tiles of gpu_hopper.py's kernel if it takes this call, else None (see BlockSizes)."""
    if block_sizes.kernel == "triton" or (block_sizes.kernel == "auto" and (interpret or not is_hopper())):
        return None
    tiles = block_sizes.hopper or gpu_hopper.HopperPagedBlocks()
    reason = gpu_hopper.unsupported_reason(q, k_pages, blocks=tiles, logit_soft_cap=logit_soft_cap)
    if reason is None and interpret:
        reason = "the Mosaic GPU kernel has no interpret mode (run it compiled on Hopper)"
    if reason is not None and block_sizes.kernel == "hopper":
        raise ValueError(f"BlockSizes.kernel='hopper' cannot take this call: {reason}")
    return None if reason else tiles


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "logit_soft_cap", "sliding_window", "block_sizes",
                     "interpret", "debug", "return_lse"),
)
def paged_attention_gpu(
    q,
    k_pages,
    v_pages,
    lengths,
    page_table,
    *,
    sm_scale: float | None = None,
    logit_soft_cap: float | None = None,
    sliding_window: int | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
    debug: bool = False,
    return_lse: bool = False,
):
    """Paged decode attention; arguments as in `reference.paged_attention_reference`."""
    b, h, d = q.shape
    hkv, num_pages, page_size, _ = k_pages.shape
    g = h // hkv
    max_pages = page_table.shape[1]
    check_supported(q, k_pages)
    if block_sizes is None:
        block_sizes = BlockSizes.get_default(page_size=page_size, head_dim=d, max_pages=max_pages)
    if sm_scale is None:
        sm_scale = d**-0.5
    # Every table entry a valid page index (stale entries past a sequence's end are
    # masked by position, but must be safe to load).
    table = jnp.clip(page_table.astype(jnp.int32), 0, num_pages - 1)
    lengths = lengths.astype(jnp.int32)
    qg = q.reshape(b, hkv, g, d)  # [B, Hkv, G, D]: heads of a group are contiguous
    hopper = _hopper_tiles(q, k_pages, block_sizes, interpret, logit_soft_cap)
    if hopper is not None:
        num_blocks = pl.cdiv(max_pages, hopper.block_k // page_size)
        splits = hopper.num_splits or default_num_splits(b, hkv, num_blocks, _num_sms())
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, gpu_hopper.WGMMA_ROWS - g), (0, 0)))
        o, lse = gpu_hopper.partial_attention(
            qg, k_pages, v_pages, lengths, table, group=g, sm_scale=sm_scale,
            sliding_window=sliding_window, num_splits=min(splits, num_blocks), blocks=hopper)
        return _finish(o, lse[..., :g], q, return_lse)

    ppb = block_sizes.pages_per_block
    if k_pages.dtype.itemsize == 2:
        ppb = max(ppb, _next_pow2(pl.cdiv(_MIN_DOT_K_16BIT, page_size)))
    num_blocks = pl.cdiv(max_pages, ppb)
    splits = block_sizes.num_splits or default_num_splits(b, hkv, num_blocks, _num_sms())
    splits = min(splits, num_blocks)
    pps = pl.cdiv(num_blocks, splits) * ppb  # pages per split, a whole number of blocks
    splits = pl.cdiv(max_pages, pps)

    # Page table padded to splits * pps entries (the padding is masked by position).
    table = jnp.pad(table, ((0, 0), (0, splits * pps - max_pages)))
    table = table.reshape(b, splits, pps)  # [B, S, pages_per_split]
    gp = max(_MIN_DOT_M, _next_pow2(g))
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, gp - g), (0, 0)))  # [B, Hkv, Gp, D]
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

    kernel = functools.partial(
        _kernel, sm_scale=sm_scale, logit_soft_cap=logit_soft_cap,
        sliding_window=sliding_window, pages_per_block=ppb, precision=precision)
    name = f"paged_attention_ppb{ppb}_splits{splits}"
    with jax.named_scope(name):
        o, lse = pl.pallas_call(
            kernel,
            grid=(b, hkv, splits),
            in_specs=[
                pl.BlockSpec((None, 1), lambda i, j, s: (i, 0)),  # lengths [B, 1]
                pl.BlockSpec((None, None, pps), lambda i, j, s: (i, s, 0)),  # table
                pl.BlockSpec((None, None, gp, d), lambda i, j, s: (i, j, 0, 0)),  # q
                pl.BlockSpec((None, num_pages, page_size, d), lambda i, j, s: (j, 0, 0, 0)),
                pl.BlockSpec((None, num_pages, page_size, d), lambda i, j, s: (j, 0, 0, 0)),
            ],
            out_specs=[
                pl.BlockSpec((None, None, None, gp, d), lambda i, j, s: (s, i, j, 0, 0)),
                pl.BlockSpec((None, None, None, gp), lambda i, j, s: (s, i, j, 0)),
            ],
            out_shape=[
                jax.ShapeDtypeStruct((splits, b, hkv, gp, d), jnp.float32),
                jax.ShapeDtypeStruct((splits, b, hkv, gp), jnp.float32),
            ],
            compiler_params=plgpu.CompilerParams(
                num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
            interpret=interpret,
            debug=debug,
            name=name,
            cost_estimate=pl.CostEstimate(
                flops=4 * b * h * max_pages * page_size * d,
                transcendentals=b * h * max_pages * page_size,
                bytes_accessed=2 * b * hkv * max_pages * page_size * d * k_pages.dtype.itemsize,
            ),
        )(lengths.reshape(b, 1), table, qg, k_pages, v_pages)
    return _finish(o[..., :g, :], lse[..., :g], q, return_lse)


def _finish(o, lse, q, return_lse: bool):
    """Merge the splits' o [S, B, Hkv, G, D] and lse [S, B, Hkv, G] into q's layout."""
    if o.shape[0] == 1:
        o, lse = o[0], lse[0]
    else:
        o, lse = merge_splits(o, lse)  # [B, Hkv, G, D], [B, Hkv, G]
    b, h, d = q.shape
    o = o.reshape(b, h, d)
    if return_lse:  # partial results to merge (cascade.py): keep f32
        return o, lse.reshape(b, h)
    return o.astype(q.dtype)
