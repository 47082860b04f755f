"""Next-token sampling: greedy, temperature, top-k, top-p (nucleus), per-request seeds.

For each row of logits [B, V], with that row's own parameters (so one batch can mix
greedy and sampled requests), in the order Hugging Face's logits warpers apply them:

  temperature == 0   greedy: argmax of the raw logits (top-k / top-p ignored).
  temperature T > 0  logits / T, then
  top-k  k > 0       keep the logits >= the k-th largest (Fan et al. 2018, "Hierarchical
                     Neural Story Generation"); ties with the k-th are kept;
  top-p  p < 1       keep the smallest set of most probable tokens whose probability
                     reaches p (Holtzman et al. 2020, "The Curious Case of Neural Text
                     Degeneration"): sorted by probability, a token is kept while the
                     mass *before* it is < p (so the top token always is); ties with
                     the last kept token are kept;
  then one draw from softmax of what is kept.

Randomness is per request, not per batch: the key of a request's i-th generated token
is `fold_in(key(seed), i)`, so its tokens do not depend on which other requests share
the batch, nor on a preemption that recomputes it.

    import jax, jax.numpy as jnp
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
    keys = request_keys(jnp.array([7]), jnp.array([0]))
    tok = sample_tokens(logits, keys, temperature=jnp.array([1.0]),
                        top_k=jnp.array([0]), top_p=jnp.array([0.6]))   # 0 or 1, never 2
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request generates.

    Attributes:
      max_new_tokens: tokens to generate at most (>= 1).
      temperature: 0 for greedy, else the softmax temperature (> 0).
      top_k: keep the k most likely tokens (0: off).
      top_p: nucleus mass in (0, 1] (1: off).
      seed: the request's random seed, an int in [0, 2**32).
      stop_tokens: generation ends after any of these tokens (it is kept in the output).
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_tokens: tuple[int, ...] = ()

    def __post_init__(self):
        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be an int >= 1")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature={self.temperature!r} must be a number >= 0 (0: greedy)")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an int >= 0 (0: off)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must lie in (0, 1] (1: off)")
        if not is_int(self.seed) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed={self.seed!r} must be an int in [0, 2**32)")
        stops = tuple(self.stop_tokens)
        if not all(is_int(t) and t >= 0 for t in stops):
            raise ValueError(f"stop_tokens={self.stop_tokens!r} must be non-negative token ids")
        object.__setattr__(self, "stop_tokens", stops)

    @classmethod
    def from_kwargs(cls, **kwargs) -> SamplingParams:
        """Like the constructor, but an unknown name is a ValueError listing the allowed ones."""
        allowed = tuple(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {unknown}; allowed: {allowed}")
        return cls(**kwargs)


def request_keys(seeds, steps):
    """One PRNG key per row: fold_in(key(seeds[b]), steps[b]); seeds, steps int [B]."""
    return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(
        seeds.astype(jnp.uint32), steps.astype(jnp.uint32))


def top_k_filter(logits, k):
    """logits [B, V] with everything below each row's k-th largest set to -inf; k [B], 0 = off."""
    v = logits.shape[-1]
    desc = -jnp.sort(-logits, axis=-1)  # [B, V] descending
    kth = jnp.take_along_axis(desc, jnp.clip(k - 1, 0, v - 1)[:, None], axis=-1)  # [B, 1]
    keep = (logits >= kth) | (k[:, None] <= 0)
    return jnp.where(keep, logits, NEG_INF)


def top_p_filter(logits, p):
    """logits [B, V] restricted to each row's nucleus of mass p [B] (p >= 1: off)."""
    desc = -jnp.sort(-logits, axis=-1)  # [B, V] descending
    probs = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(mass_before < p[:, None], axis=-1)  # >= 1: the top token has mass 0 before it
    last = jnp.take_along_axis(desc, (kept - 1)[:, None], axis=-1)  # smallest kept logit [B, 1]
    keep = (logits >= last) | (p[:, None] >= 1.0)
    return jnp.where(keep, logits, NEG_INF)


def filter_logits(logits, temperature, top_k, top_p):
    """Temperature, then top-k, then top-p, per row; f32 [B, V] (temperature 0 rows unscaled)."""
    logits = logits.astype(jnp.float32)
    t = jnp.where(temperature > 0, temperature, 1.0).astype(jnp.float32)
    return top_p_filter(top_k_filter(logits / t[:, None], top_k), top_p)


def sample_tokens(logits, keys, temperature, top_k, top_p, *, any_sampled=True):
    """Next token [B] int32 from logits [B, V] with per-row parameters [B] and keys [B].

    `any_sampled` is static: False says every row is greedy (temperature 0), so the
    filters (two sorts of [B, V]) and the draw are left out of the computation. The
    caller knows this on the host; deciding it on the device with a `lax.cond` made
    XLA on a GPU copy the predicate to the host and wait for it in every decoding step.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not any_sampled:
        return greedy
    filtered = filter_logits(logits, temperature, top_k, top_p)
    drawn = jax.vmap(jax.random.categorical)(keys, filtered)
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)
