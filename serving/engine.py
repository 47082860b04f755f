"""A batched generation engine: prefill + decode with continuous batching.

Orca (Yu et al., OSDI 2022) schedules at the granularity of iterations: requests join
the running batch as soon as a slot frees and leave it the step they finish, instead
of waiting for the whole batch. Here the batch has `max_slots` fixed rows (one jit
shape for decode); each row holds one request and its own length in the KV cache
(serving/cache.py). One `step()`:

  1. admit waiting requests into free slots and prefill them together: one model call
     of T tokens per row (T a bucket of prompt lengths); with a dense cache every slot
     is a row (the others padded with segment id 0, so their caches stay untouched),
     with a paged one only the admitted requests are (the pools are shared, rows only
     carry block tables), padded to a power of two; each new request samples its
     first token from the logits of its last prompt token;
  2. decode: one device call of up to `decode_steps` model calls of [max_slots, 1]
     (a `lax.scan` feeding every running request the token it sampled last, so the
     host is not in the loop per token); finished requests (stop token,
     max_new_tokens) leave, and what a row sampled after its stop token is dropped.
     Whether any row samples (temperature > 0) is decided on the host: an all-greedy
     call is compiled without the sampling filters, and no device-side branch makes
     the GPU wait for the host at every token.

With `cache_kind="paged"` the KV cache lives in a page pool (serving/paged.py) and,
with `radix=True`, a radix tree of token prefixes (serving/radix.py, SGLang's
RadixAttention) keeps the pages of prompts and finished requests: a new request
whose prompt starts with a cached prefix takes those pages and prefills only the
rest. When the pool runs out: least recently used cached prefixes are evicted; if
that is not enough, a request waits for pages (at admission) or the most recently
admitted running request is preempted (during decode): its pages are given back
(its tokens kept in the radix tree, if on) and it is recomputed later from its
prompt plus the tokens it had generated. Sampling keys depend only on the request's
seed and token index, so preemption never changes a token. Running requests that hold
the same cached prompt pages decode with cascade attention (`cascade=True`): those
pages are read once per chunk of rows, not once per row.

    from serving.engine import Engine
    engine = Engine(model, max_slots=8, max_len=256)
    outs = engine.generate([[1, 2, 3], [4, 5]], max_new_tokens=16)          # greedy
    outs = engine.generate([[1, 2, 3]], temperature=0.8, top_p=0.9, seed=1)

    engine = Engine(model, max_slots=8, max_len=256, cache_kind="paged", radix=True)
    rid = engine.submit([1, 2, 3], max_new_tokens=8)     # continuous batching by hand:
    engine.step(); engine.submit([7, 8], max_new_tokens=4); engine.run()
    engine.result(rid)
"""
from __future__ import annotations

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arch.dropout import with_dropout
from pallas_kernels.paged_attention.cascade import find_shared_prefix
from serving.cache import PagedKV, init_cache, reset_rows
from serving.paged import BlockTables, PagePool, PoolExhausted, copy_pages
from serving.radix import RadixCache
from serving.sampling import SamplingParams, request_keys, sample_tokens

CACHE_KINDS = ("dense", "rolling", "paged")
BUCKET_STEP = 512  # prefill lengths above it are rounded to multiples of it


@dataclasses.dataclass
class _Request:
    rid: int
    prompt: list[int]
    params: SamplingParams
    output: list[int] = dataclasses.field(default_factory=list)
    done: bool = False
    radix_node: object = None  # locked radix path (paged + radix)

    @property
    def tokens(self) -> list[int]:
        """Prompt and generated tokens: what (re)admission prefills."""
        return self.prompt + self.output

    def span(self, lo: int, hi: int) -> list[int]:
        """tokens[lo:hi] without building the whole list (prompts run to thousands)."""
        n = len(self.prompt)
        if hi <= n:
            return self.prompt[lo:hi]
        return self.prompt[lo:hi] + self.output[max(lo - n, 0):hi - n]

    @property
    def written(self) -> int:
        """Tokens whose keys/values are in the cache while it runs: all but the last sampled."""
        return len(self.prompt) + len(self.output) - 1


@dataclasses.dataclass
class EngineStats:
    steps: int = 0
    prefill_calls: int = 0
    prefill_tokens: int = 0          # tokens run through prefill (radix hits excluded)
    cached_prompt_tokens: int = 0    # prompt tokens served from the radix cache
    decode_tokens: int = 0
    preemptions: int = 0


def _run_model(model, cache, tokens, positions, segment_ids, last):
    """One model call on every slot; logits [B, V] at each row's `last` index.

    The steps of `Transformer.__call__`, but the output head runs on one position per
    row: a prefill needs no [B, T, vocab] logits.
    """
    x = model.embed_tokens(tokens, positions)                                 # [B, T, D]
    x, layer_aux = model.stack(x, positions=positions, segment_ids=segment_ids, cache=cache)
    x = jnp.take_along_axis(x, last[:, None, None], axis=1)                  # [B, 1, D]
    return model.head(x)[:, 0], tuple(a["cache"] for a in layer_aux)


def _generate(graphdef, num_steps, block_sizes, any_sampled, state, cache, reset, page_table,
              lengths, prefix, tokens, positions, segment_ids, last, seeds, steps, temperature,
              top_k, top_p):
    """Prefill (num_steps=1, T >= 1) or decode `num_steps` tokens (T = 1) on every slot.

    Decoding several tokens per call keeps the loop on the device: each step feeds
    every row the token it just sampled, one position further. The host drops what a
    row sampled after its stop token. Returns (tokens [B, num_steps], cache).
    """
    model = nnx.merge(graphdef, state)
    paged = page_table is not None
    if paged:  # the pools travel; the host's block tables say which rows use which pages
        cache = tuple(PagedKV(k_pages=k, v_pages=v, page_table=page_table, lengths=lengths,
                              prefix=prefix, block_sizes=block_sizes) for k, v in cache)
    else:
        cache = reset_rows(cache, reset)

    def one_token(cache, tokens, positions, steps):
        logits, cache = _run_model(model, cache, tokens, positions, segment_ids, last)
        tok = sample_tokens(logits, request_keys(seeds, steps), temperature, top_k, top_p,
                            any_sampled=any_sampled)
        return tok, cache

    def pools(cache):
        return tuple((c.k_pages, c.v_pages) for c in cache) if paged else cache

    tok, cache = one_token(cache, tokens, positions, steps)
    if num_steps == 1:
        return tok[:, None], pools(cache)

    def body(carry, _):
        cache, tok, pos, steps = carry
        pos, steps = pos + 1, steps + 1
        nxt, cache = one_token(cache, tok[:, None], pos, steps)
        return (cache, nxt, pos, steps), nxt

    (cache, *_), rest = jax.lax.scan(body, (cache, tok, positions, steps), length=num_steps - 1)
    return jnp.concatenate([tok[:, None], rest.T], axis=1), pools(cache)


def serving_params(state, dtype):
    """Weight matrices cast to the compute dtype once, instead of at every use.

    Training keeps f32 master weights and casts each matrix where it is used; decoding
    would repeat that cast (a full pass over the weights) at every token. Every
    matrix use casts to the compute dtype first, so the cast changes no value
    (tests/serving/test_engine.py checks the logits bit for bit) — except the MoE
    router, which computes in f32 on purpose and keeps its f32 weights; vectors (norm
    scales, biases, sinks) stay as they are.
    """
    dtype = jnp.dtype(dtype)

    def cast(path, var):
        x = var[...]
        if (type(var) is nnx.Param and x.ndim >= 2 and jnp.issubdtype(x.dtype, jnp.floating)
                and x.dtype != dtype and "router" not in jax.tree_util.keystr(path)):
            return var.replace(x.astype(dtype))
        return var

    return jax.tree_util.tree_map_with_path(cast, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


@functools.lru_cache(maxsize=8)
def _compiled(graphdef):
    """The jitted `_generate` of one model structure, shared by every engine over it.

    Hashing a graphdef costs milliseconds (it walks the whole module tree), so it is
    bound here once per engine instead of being a static argument of every call. The
    cache is donated (its buffers are reused in place) on every backend, so CPU tests
    catch what donation forbids (one buffer passed twice).
    """
    return jax.jit(functools.partial(_generate, graphdef), static_argnums=(0, 1, 2), donate_argnums=4)


class Engine:
    """Continuous-batching generation over a causal decoder (see the module docstring).

    Args:
      model: a decoder (arch.build_model) with list layers (scan_layers=False).
      max_slots: rows of the running batch.
      max_len: longest request (prompt + new tokens); default model.max_seq_len.
      cache_kind: "dense", "rolling" (sliding-window / chunked layers bounded by their
        window) or "paged".
      page_size, num_pages: the page pool (paged only); num_pages defaults to enough
        for every slot at max_len.
      radix: reuse cached prefixes through a radix tree (paged only).
      cascade: in decode, read the pages that running requests share (a radix-cached
        prompt) once per chunk of rows instead of once per row
        (pallas_kernels/paged_attention/cascade.py; paged only, not in sliding-window
        layers).
      paged_block_sizes: the paged decode kernel's BlockSizes (paged only; e.g.
        `pallas_kernels.paged_attention.gpu.BlockSizes(kernel="triton")` to compare
        the GPU kernels); None: the backend's defaults.
      min_bucket: shortest prefill length; prefill lengths are powers of two from it
        up to BUCKET_STEP, then multiples of BUCKET_STEP (a 2,080-token prompt runs as
        2,560, not 4,096).
      decode_steps: most tokens decoded per device call (the loop runs on the device;
        powers of two up to it, never past the nearest max_new_tokens). Requests join
        and leave between calls, so larger values trade admission latency and work
        wasted after stop tokens for less host overhead per token.
    """

    def __init__(self, model, *, max_slots: int = 8, max_len: int | None = None,
                 cache_kind: str = "dense", page_size: int = 16, num_pages: int | None = None,
                 radix: bool = False, min_bucket: int = 16, decode_steps: int = 8,
                 cascade: bool = True, paged_block_sizes=None):
        cfg = model.cfg
        if cache_kind not in CACHE_KINDS:
            raise ValueError(f"{cache_kind=} must be one of {CACHE_KINDS}")
        if radix and cache_kind != "paged":
            raise ValueError(f"radix=True needs cache_kind='paged', got {cache_kind=}")
        if not isinstance(max_slots, int) or max_slots < 1:
            raise ValueError(f"{max_slots=} must be a positive int")
        if not isinstance(min_bucket, int) or min_bucket < 1:
            raise ValueError(f"{min_bucket=} must be a positive int")
        if not isinstance(decode_steps, int) or decode_steps < 1:
            raise ValueError(f"{decode_steps=} must be a positive int")
        self.cfg = cfg
        self.max_len = cfg.max_seq_len if max_len is None else max_len
        self.max_slots, self.kind, self.min_bucket = max_slots, cache_kind, min_bucket
        self.decode_steps = decode_steps
        self.cascade = cascade and cache_kind == "paged"
        self.paged_block_sizes = paged_block_sizes
        self.cache = init_cache(cfg, max_slots, self.max_len, cache_kind,
                                page_size=page_size, num_pages=num_pages)
        if cache_kind == "paged":  # keep the pools; block tables come from the host per call
            self.max_pages = self.cache[0].page_table.shape[1]
            self.cache = tuple((c.k_pages, c.v_pages) for c in self.cache)
        # Serving never drops: a view with every dropout off, whatever the model's mode.
        self.graphdef, state = nnx.split(with_dropout(model, False))
        self.state = serving_params(state, cfg.dtype)
        self._generate = _compiled(self.graphdef)
        self.tables = self.radix = None
        if cache_kind == "paged":
            pool = PagePool(self.cache[0][0].shape[1], page_size)
            self.tables = BlockTables(pool)
            self.radix = RadixCache(pool) if radix else None
        self.slots: list[_Request | None] = [None] * max_slots
        self.waiting: collections.deque[_Request] = collections.deque()
        self.requests: dict[int, _Request] = {}
        self.stats = EngineStats()
        self._next_rid = 0

    # -- requests -------------------------------------------------------------------

    def submit(self, prompt, **params) -> int:
        """Queue a request; returns its id. `params`: SamplingParams fields."""
        sp = SamplingParams.from_kwargs(**params)
        prompt = np.asarray(prompt).reshape(-1).astype(np.int64).tolist()
        self._check_request(prompt, sp)
        rid = self._next_rid
        self._next_rid += 1
        req = _Request(rid, prompt, sp)
        self.requests[rid] = req
        self.waiting.append(req)
        return rid

    def _check_request(self, prompt, sp: SamplingParams) -> None:
        vocab = self.cfg.vocab_size
        if not prompt:
            raise ValueError("prompt must hold at least one token")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt token ids must lie in [0, model.vocab_size={vocab})")
        if len(prompt) > self.cfg.max_seq_len:
            raise ValueError(f"prompt length {len(prompt)} exceeds model.max_seq_len="
                             f"{self.cfg.max_seq_len}")
        total = len(prompt) + sp.max_new_tokens
        if total > self.max_len:
            raise ValueError(f"prompt length {len(prompt)} + max_new_tokens={sp.max_new_tokens} "
                             f"= {total} exceeds the engine's max_len={self.max_len}")
        if any(t >= vocab for t in sp.stop_tokens):
            raise ValueError(f"stop_tokens={sp.stop_tokens} must lie in [0, {vocab})")
        if self.tables is not None:
            need = -(-total // self.tables.page_size)
            if need > self.tables.pool.num_pages:
                raise ValueError(f"a request of {total} tokens needs {need} pages; the pool has "
                                 f"num_pages={self.tables.pool.num_pages}")

    def result(self, rid: int) -> list[int]:
        """Generated tokens of a request so far (all of them once it is done)."""
        return list(self.requests[rid].output)

    def done(self, rid: int) -> bool:
        return self.requests[rid].done

    @property
    def idle(self) -> bool:
        return not self.waiting and all(r is None for r in self.slots)

    def run(self) -> dict[int, list[int]]:
        """Step until every request is done; returns {rid: generated tokens}."""
        while not self.idle:
            self.step()
        return {rid: list(r.output) for rid, r in self.requests.items()}

    def generate(self, prompts, **params) -> list[list[int]]:
        """Generate for each prompt with the same `params`; outputs in prompt order."""
        rids = [self.submit(p, **params) for p in prompts]
        self.run()
        return [self.result(r) for r in rids]

    # -- one iteration --------------------------------------------------------------

    def step(self) -> list[int]:
        """Admit + prefill, then one decode step. Returns the ids that finished."""
        self.stats.steps += 1
        finished = []
        admitted = self._admit()
        if admitted:
            finished += self._prefill(admitted)
        running = [i for i, r in enumerate(self.slots) if r is not None]
        if running:
            finished += self._decode()
        elif self.waiting and not admitted:  # cannot happen: a lone request always fits
            raise RuntimeError("engine stalled: requests wait but none can be admitted")
        return finished

    def _admit(self) -> list[tuple[int, int]]:
        """Move waiting requests into free slots; returns (slot, cached prefix length)."""
        admitted = []
        free = [i for i, r in enumerate(self.slots) if r is None]
        while free and self.waiting:
            req = self.waiting[0]
            if self.radix is not None and self._prefix_in_flight(req, admitted):
                break  # next step its prefix is cached: prefill only the rest then
            start = 0
            if self.tables is not None:
                start = self._allocate(req)
                if start is None:  # not enough pages: wait for running requests to finish
                    break
            self.waiting.popleft()
            slot = free.pop(0)
            self.slots[slot] = req
            admitted.append((slot, start))
        return admitted

    def _prefix_in_flight(self, req: _Request, admitted) -> bool:
        """True if a request admitted this step computes at least a page of `req`'s
        prompt that the radix tree does not hold yet."""
        if not admitted:
            return False
        prompt = req.tokens[:-1]
        cached = self.radix.match_prefix(prompt, record_stats=False).length  # whole pages
        need = cached + self.tables.page_size  # one more full page in common
        if len(prompt) < need:
            return False
        page, head = prompt[cached:need], prompt[:cached]
        # C-speed list comparisons, the page past the cached prefix first: it tells most
        # requests apart in 16 tokens, where the whole prefix runs to thousands (and a
        # step admits tens of requests, each checked against all admitted before it).
        for slot, _ in admitted:
            other = self.slots[slot]
            if other.span(cached, need) == page and other.span(0, cached) == head:
                return True
        return False

    def _allocate(self, req: _Request) -> int | None:
        """Pages for a request's tokens, reusing a radix-cached prefix; None if none free."""
        tokens = req.tokens
        pages, start, node = [], 0, None
        if self.radix is not None:
            # Leave at least one token to prefill: its logits give the next token.
            m = self.radix.match_prefix(tokens[:-1], record_stats=False)
            pages, start, node = m.pages, m.length, m.node
            self.radix.lock(node)
        while True:
            try:
                plan = self.tables.allocate(req.rid, len(tokens), prefix_pages=pages, prefix_len=start)
                break
            except PoolExhausted as e:
                if self.radix is None or not self.radix.evict(e.needed - e.available):
                    if node is not None:
                        self.radix.unlock(node)
                    return None
        self._copy_pages(plan.copies)
        req.radix_node = node
        return start

    def _prefill(self, admitted) -> list[int]:
        lengths = [len(self.slots[s].tokens) - start for s, start in admitted]
        t = self._bucket(max(lengths))
        if self.tables is None:  # dense rows live in the cache: every slot takes part
            rows = list(range(self.max_slots))
        else:  # paged: only the admitted rows, padded to a power of two (fewer shapes)
            rows = [slot for slot, _ in admitted]
            rows += [None] * (min(_next_pow2(len(rows)), self.max_slots) - len(rows))
        row_of = {slot: r for r, slot in enumerate(rows) if slot is not None}
        b = len(rows)
        tokens = np.zeros((b, t), np.int32)
        positions = np.zeros((b, t), np.int32)
        segs = np.zeros((b, t), np.int32)
        last = np.zeros((b,), np.int32)
        reset = np.zeros((b,), bool)
        for (slot, start), n in zip(admitted, lengths, strict=True):
            r = row_of[slot]
            tokens[r, :n] = self.slots[slot].tokens[start:]
            positions[r, :n] = np.arange(start, start + n)
            segs[r, :n] = 1
            last[r] = n - 1
            reset[r] = True  # dense rows start empty; paged rows get lengths from the host
            self.stats.cached_prompt_tokens += start
            self.stats.prefill_tokens += n
        self.stats.prefill_calls += 1
        starts = {slot: start for slot, start in admitted}
        tok = self._call(rows, tokens, positions, segs, last, reset, starts, num_steps=1)
        finished = []
        for slot, _ in admitted:
            req = self.slots[slot]
            if self._append(slot, int(tok[row_of[slot], 0])):
                finished.append(req.rid)
            elif self.radix is not None:  # the prompt's pages serve later requests at once
                self._cache_prefix(req)
        return finished

    def _decode(self) -> list[int]:
        b = self.max_slots
        num_steps = self._num_decode_steps()
        if self.tables is not None:
            self._reserve_decode_pages(num_steps)
        rows = [i for i, r in enumerate(self.slots) if r is not None]
        tokens = np.zeros((b, 1), np.int32)
        positions = np.zeros((b, 1), np.int32)
        segs = np.zeros((b, 1), np.int32)
        for i in rows:
            req = self.slots[i]
            tokens[i, 0] = req.output[-1]
            positions[i, 0] = len(req.prompt) + len(req.output) - 1
            segs[i, 0] = 1
        starts = {i: int(positions[i, 0]) for i in rows}
        tok = self._call(list(range(b)), tokens, positions, segs, np.zeros((b,), np.int32),
                         np.zeros((b,), bool), starts, num_steps=num_steps, decode=True)
        finished = []
        for i in rows:
            rid = self.slots[i].rid
            for j in range(num_steps):  # tokens after a stop token are dropped
                self.stats.decode_tokens += 1
                if self._append(i, int(tok[i, j])):
                    finished.append(rid)
                    break
        return finished

    def _num_decode_steps(self) -> int:
        """The largest power of two <= decode_steps that no running request outlasts."""
        left = min(r.params.max_new_tokens - len(r.output) for r in self.slots if r is not None)
        n = 1
        while n * 2 <= min(left, self.decode_steps):
            n *= 2
        return n

    def _call(self, rows, tokens, positions, segs, last, reset, starts, *, num_steps,
              decode=False):
        """Run the jitted model on batch rows `rows` (engine slots, None = padding).

        `starts` maps the slots being written to their cache length before the call;
        the other busy slots keep theirs. Returns sampled tokens [len(rows), num_steps].
        """
        b = len(rows)
        seeds = np.zeros((b,), np.uint32)
        steps = np.zeros((b,), np.int32)
        temp = np.zeros((b,), np.float32)
        top_k = np.zeros((b,), np.int32)
        top_p = np.ones((b,), np.float32)
        busy = [(r, self.slots[slot]) for r, slot in enumerate(rows)
                if slot is not None and self.slots[slot] is not None]
        for r, req in busy:
            seeds[r], steps[r] = req.params.seed, len(req.output)
            temp[r], top_k[r], top_p[r] = req.params.temperature, req.params.top_k, req.params.top_p
        table = lengths = prefix = None
        if self.tables is not None:
            table = np.zeros((b, self.max_pages), np.int32)
            lengths = np.zeros((b,), np.int32)
            held = np.zeros((b,), np.int32)  # pages a row holds: room for what this call writes
            if busy:
                idx = [r for r, _ in busy]
                table[idx] = self.tables.block_table([req.rid for _, req in busy], max_pages=self.max_pages)
                for r, req in busy:
                    lengths[r] = starts.get(rows[r], req.written)
                    held[r] = self.tables.num_pages(req.rid)
            if decode and self.cascade:
                prefix = find_shared_prefix(table, lengths, self.tables.page_size, pages_held=held)
        any_sampled = bool((temp > 0).any())  # all greedy: no sort, no draw in the call
        tok, self.cache = self._generate(num_steps, self.paged_block_sizes, any_sampled,
                                         self.state, self.cache,
                                         reset, table, lengths, prefix, tokens, positions, segs,
                                         last, seeds, steps, temp, top_k, top_p)
        return np.asarray(tok)

    def _append(self, slot: int, token: int) -> bool:
        """Record a sampled token; finish the request if it is done. True if finished."""
        req = self.slots[slot]
        req.output.append(token)
        sp = req.params
        if token in sp.stop_tokens or len(req.output) >= sp.max_new_tokens:
            req.done = True
            self._release(slot, keep_in_radix=True)
            return True
        return False

    def _bucket(self, n: int) -> int:
        t = self.min_bucket
        while t < n and t < BUCKET_STEP:
            t *= 2
        if t < n:
            t = -(-n // BUCKET_STEP) * BUCKET_STEP
        return min(t, max(self.max_len, n))

    # -- pages ------------------------------------------------------------------------

    def _reserve_decode_pages(self, num_tokens: int) -> None:
        """Slots for `num_tokens` more tokens of every running request; evict, then
        preempt, when out of pages."""
        for i in range(self.max_slots):
            req = self.slots[i]
            while req is not None:
                try:
                    self._copy_pages(self.tables.append(req.rid, num_tokens).copies)
                    break
                except PoolExhausted as e:
                    if self.radix is not None and self.radix.evict(e.needed - e.available):
                        continue
                    victim = max((j for j, r in enumerate(self.slots) if r is not None),
                                 key=lambda j: self.slots[j].rid)
                    self._preempt(victim)
                    if victim == i:
                        break

    def _preempt(self, slot: int) -> None:
        req = self.slots[slot]
        self._release(slot, keep_in_radix=True)
        self.waiting.appendleft(req)  # recomputed from prompt + output when pages free up
        self.stats.preemptions += 1

    def _release(self, slot: int, *, keep_in_radix: bool) -> None:
        req = self.slots[slot]
        self.slots[slot] = None
        if self.tables is None:
            return
        if self.radix is not None:
            if keep_in_radix:
                self._cache_prefix(req)
            if req.radix_node is not None:
                self.radix.unlock(req.radix_node)
                req.radix_node = None
        self.tables.free(req.rid)

    def _cache_prefix(self, req: _Request) -> None:
        """Insert the request's cached tokens into the radix tree and lock their path."""
        tokens = req.tokens[:req.written]
        self.radix.insert(tokens, self.tables.pages(req.rid))
        node = self.radix.match_prefix(tokens, record_stats=False).node
        self.radix.lock(node)
        if req.radix_node is not None:
            self.radix.unlock(req.radix_node)
        req.radix_node = node

    def _copy_pages(self, copies) -> None:
        if not copies:
            return
        self.cache = tuple(copy_pages(k, v, copies) for k, v in self.cache)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
