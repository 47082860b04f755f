"""Serving a hybrid (Mamba-2 + attention) model: the engine with SSM state caches gives
the tokens of trainer/sample.generate, which recomputes the full forward pass per token."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arch import build_model
from configs.hybrid import get_config
from serving.cache import SSMState, init_cache, reset_rows
from serving.engine import Engine
from trainer.sample import generate

LENGTH = 16  # prompt + new tokens of every request (one compiled reference forward)
# Chunks of 8: the 9-token prompt's prefill spans two. On a GPU also 16, which the Pallas
# SSD kernel takes (it needs a power of two >= 16): the engine's prefill then runs it from
# the cached state.
CHUNKS = (8, 16) if jax.default_backend() == "gpu" else (8,)


def hybrid_model(chunk_size: int = 8):
    cfg = get_config("tiny,arch=nemotron_h").model
    cfg.update(d_model=32, num_layers=3, layer_pattern=("mamba", "nope", "mlp"), num_heads=2,
               num_kv_heads=1, head_dim=16, mlp_dim=64, max_seq_len=32, init_std=0.1)
    cfg.ssm.update(d_state=8, head_dim=16, n_groups=2, chunk_size=chunk_size)
    return build_model(cfg, nnx.Rngs(params=4))


@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_engine_equals_full_recompute_with_continuous_batching(chunk_size):
    """Three requests on two slots: the third takes a freed slot, whose SSM state must be
    reset; prompts of different lengths share a ragged prefill; decode runs 2 steps a call."""
    model = hybrid_model(chunk_size)
    prompts = [[5, 17, 3, 99, 42], [7, 8], [250, 1, 2, 3, 4, 5, 6, 7, 9]]
    engine = Engine(model, max_slots=2, max_len=32, decode_steps=2)
    rids = [engine.submit(p, max_new_tokens=LENGTH - len(p)) for p in prompts]
    engine.run()
    for p, rid in zip(prompts, rids, strict=True):
        want = generate(model, p, max_new_tokens=LENGTH - len(p))[len(p):]
        assert engine.result(rid) == want.tolist(), p
    assert isinstance(engine.cache[0], SSMState)


def test_ssm_state_reset_zeroes_only_its_rows():
    cfg = hybrid_model().cfg
    cache = init_cache(cfg, batch=3, max_len=8)
    layer = cache[0].replace(conv=cache[0].conv + 1, ssm=cache[0].ssm + 2,
                             lengths=jnp.array([4, 5, 6], jnp.int32))
    out = reset_rows((layer,) + cache[1:], np.array([False, True, False]))[0]
    np.testing.assert_array_equal(out.lengths, [4, 0, 6])
    np.testing.assert_array_equal(np.asarray(out.ssm)[:, 0, 0, 0], [2, 0, 2])
    np.testing.assert_array_equal(np.asarray(out.conv)[:, 0, 0], [1, 0, 1])
