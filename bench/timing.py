"""Timing for the kernel benches: the median over repetitions of a compiled call."""
from __future__ import annotations

import statistics
import time

import jax


def median_time(fn, *args, reps: int = 5, budget_s: float = 0.25) -> float:
    """Seconds per call of `fn(*args)`: compile, size the loop to ~`budget_s` from one
    timed call (1 to 50 iterations), then the median of `reps` timed loops."""
    jax.block_until_ready(fn(*args))  # compile
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    iters = max(1, min(50, int(budget_s / max(first, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)
