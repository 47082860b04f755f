"""Text from a trained model by recomputing the full forward pass for every new token.

The plainest correct decoder: no KV cache, so each token costs a whole forward pass
over the buffer. The buffer has a fixed length (prompt + new tokens), so one compiled
forward serves every step; a causal model never looks past the current position, so
the unfilled tail does not change the logits read at it. serving/ does this fast
(and is tested against this kind of loop).

    >>> ids = generate(model, tokenizer.encode("def "), max_new_tokens=64)   # greedy
    >>> print(tokenizer.decode(ids))
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arch.dropout import with_dropout


@nnx.jit
def _logits_at(model, tokens, index):
    logits, _ = with_dropout(model, False)(tokens)  # [1, L, V]; sampling never drops
    return jax.lax.dynamic_index_in_dim(logits[0], index, axis=0, keepdims=False)  # [V]


def generate(model, prompt, *, max_new_tokens: int, temperature: float = 0.0,
             rng: jax.Array | None = None) -> np.ndarray:
    """Prompt ids followed by `max_new_tokens` sampled ids (int32 numpy array).

    Args:
      model: a causal LM, `model(tokens [1, L]) -> (logits [1, L, V], aux)`.
      prompt: 1-D token ids, at least one.
      max_new_tokens: tokens to add; prompt + new must fit `model.cfg.max_seq_len`.
      temperature: 0 is greedy (argmax); > 0 samples from softmax(logits / temperature).
      rng: a jax PRNG key, needed when temperature > 0.
    """
    prompt = np.asarray(prompt, np.int32).reshape(-1)
    if prompt.size < 1:
        raise ValueError("prompt must hold at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"{max_new_tokens=} must be >= 0")
    if temperature < 0:
        raise ValueError(f"{temperature=} must be >= 0")
    if temperature > 0 and rng is None:
        raise ValueError("temperature > 0 needs an rng key")
    length = prompt.size + max_new_tokens
    limit = model.cfg.max_seq_len
    if length > limit:
        raise ValueError(f"prompt ({prompt.size} tokens) + {max_new_tokens=} exceeds "
                         f"model.max_seq_len={limit}")
    buf = np.zeros((1, length), np.int32)
    buf[0, : prompt.size] = prompt
    for pos in range(prompt.size, length):
        logits = _logits_at(model, jnp.asarray(buf), pos - 1)
        if temperature == 0:
            nxt = int(jnp.argmax(logits))
        else:
            rng, key = jax.random.split(rng)
            nxt = int(jax.random.categorical(key, logits / temperature))
        buf[0, pos] = nxt
    return buf[0]
