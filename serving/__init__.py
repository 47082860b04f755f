"""Serving: KV caches, paged memory, radix prefix cache, sampling and the generation engine.

    from serving import Engine
    engine = Engine(model, max_slots=8, cache_kind="paged", radix=True)
    outputs = engine.generate([[1, 2, 3], [1, 2, 4]], max_new_tokens=32, temperature=0.8, seed=0)

  cache.py     per-layer KV caches (dense, rolling window, paged; MLA stores its latent),
               and SSMState, the recurrent state of Mamba-2 layers
  paged.py     page pool, block tables, copy-on-write (host side) + device scatter
  radix.py     radix tree of token prefixes -> pages, LRU eviction
  sampling.py  greedy / temperature / top-k / top-p with per-request seeds
  engine.py    batched prefill + decode with continuous batching
"""
from serving.cache import KINDS, DenseKV, PagedKV, RollingKV, SSMState, init_cache
from serving.engine import Engine, EngineStats
from serving.sampling import SamplingParams

__all__ = ["KINDS", "DenseKV", "PagedKV", "RollingKV", "SSMState", "init_cache", "Engine", "EngineStats",
           "SamplingParams"]
