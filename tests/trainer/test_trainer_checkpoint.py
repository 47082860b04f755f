"""Checkpointer: exact round trip, broken checkpoints skipped and kept, restore onto other meshes."""
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from trainer.checkpoint import Checkpointer, CheckpointWarning, abstract_like


def tree(seed):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32),
            "opt": {"mu": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32),
                    "count": jnp.asarray(seed, jnp.int32)}}


def save_steps(directory, steps, keep=3):
    ckpt = Checkpointer(directory, keep=keep)
    for s in steps:
        ckpt.save(s, tree(s), {"row": 10 * s})
    ckpt.close()


def truncate_arrays(step_dir):
    """Damage a checkpoint the way a full disk or a killed copy does: cut its data files."""
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
             if os.path.isfile(f) and os.sep + "d" + os.sep in f]
    assert files, "expected array data files under state/.../d/"
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 3)
    return files


def uncommit(step_dir):
    """A checkpoint whose writer died before committing: no commit marker, no commit time."""
    os.remove(os.path.join(step_dir, "commit_success.txt"))
    meta_path = os.path.join(step_dir, "_CHECKPOINT_METADATA")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["commit_timestamp_nsecs"] = None
    with open(meta_path, "w") as f:
        json.dump(meta, f)


def test_round_trip_is_exact(tmp_path):
    save_steps(str(tmp_path), [1, 2])
    ckpt = Checkpointer(str(tmp_path), keep=3)
    step, state, loader = ckpt.restore_latest(abstract_like(tree(0)))
    ckpt.close()
    assert step == 2 and loader == {"row": 20}
    jax.tree.map(np.testing.assert_array_equal, state, tree(2))


def test_broken_latest_is_skipped_kept_and_pruning_spares_the_good_one(tmp_path):
    d = str(tmp_path)
    save_steps(d, [1, 2, 3], keep=3)
    truncate_arrays(os.path.join(d, "3"))
    before = sorted(os.listdir(os.path.join(d, "3", "state")))

    ckpt = Checkpointer(d, keep=3)
    with pytest.warns(CheckpointWarning, match="step 3"):
        step, state, loader = ckpt.restore_latest(abstract_like(tree(0)))
    assert step == 2 and loader == {"row": 20}
    jax.tree.map(np.testing.assert_array_equal, state, tree(2))
    # Kept as evidence, out of the way of a new save of the same step number.
    assert sorted(os.listdir(os.path.join(d, "3.corrupt", "state"))) == before
    assert ckpt.steps() == [1, 2]
    # Two new saves with keep=3 prune step 1 only once three newer good ones exist.
    ckpt.save(3, tree(33), {"row": 33})
    ckpt.wait()
    assert ckpt.steps() == [1, 2, 3]
    ckpt.save(4, tree(44), {"row": 44})
    ckpt.close()
    ckpt = Checkpointer(d, keep=3)
    assert ckpt.steps() == [2, 3, 4]
    step, state, _ = ckpt.restore_latest(abstract_like(tree(0)))
    ckpt.close()
    assert step == 4
    jax.tree.map(np.testing.assert_array_equal, state, tree(44))


def test_two_broken_steps_stop_and_only_the_latest_is_set_aside(tmp_path):
    d = str(tmp_path)
    save_steps(d, [1, 2, 3], keep=3)
    truncate_arrays(os.path.join(d, "3"))
    uncommit(os.path.join(d, "2"))
    ckpt = Checkpointer(d, keep=3)
    with pytest.warns(CheckpointWarning, match="step 3"), \
            pytest.raises(ValueError, match="steps 3 and 2 .* both unreadable"):
        ckpt.restore_latest(abstract_like(tree(0)))
    ckpt.close()
    assert sorted(os.listdir(d)) == ["1", "2", "3.corrupt"]


def test_checkpoint_of_another_tree_is_refused_and_nothing_moves(tmp_path):
    d = str(tmp_path)
    save_steps(d, [1, 2])
    other = {"w": jnp.zeros((8, 7)), "opt": tree(0)["opt"], "extra": jnp.zeros(3)}
    ckpt = Checkpointer(d, keep=3)
    with pytest.raises(ValueError, match=r"extra: \(absent\) -> \(3,\); w: \(8, 6\) -> \(8, 7\)"):
        ckpt.restore_latest(abstract_like(other))
    ckpt.close()
    assert sorted(os.listdir(d)) == ["1", "2"]


def test_read_only_restore_skips_a_broken_step_without_moving_it(tmp_path):
    d = str(tmp_path)
    save_steps(d, [1, 2])
    truncate_arrays(os.path.join(d, "2"))
    ckpt = Checkpointer(d, keep=3)
    with pytest.warns(CheckpointWarning, match="left in place"):
        step, state, _ = ckpt.restore_latest(abstract_like(tree(0)), set_aside=False)
    ckpt.close()
    assert step == 1
    jax.tree.map(np.testing.assert_array_equal, state, tree(1))
    assert sorted(os.listdir(d)) == ["1", "2"]


def test_nothing_usable_returns_none(tmp_path):
    save_steps(str(tmp_path), [5])
    truncate_arrays(os.path.join(str(tmp_path), "5"))
    ckpt = Checkpointer(str(tmp_path), keep=2)
    with pytest.warns(CheckpointWarning):
        assert ckpt.restore_latest(abstract_like(tree(0))) is None
    ckpt.close()


def test_saved_replicated_on_8_devices_restores_sharded_on_2(tmp_path):
    devices = jax.devices()
    assert len(devices) == 8, "tests/conftest.py emulates 8 CPU devices"
    mesh8 = Mesh(np.asarray(devices), ("data",))
    src = jax.device_put(tree(7), NamedSharding(mesh8, P()))       # replicated on all 8
    ckpt = Checkpointer(str(tmp_path), keep=1)
    ckpt.save(1, src, {"row": 0})
    ckpt.close()

    mesh2 = Mesh(np.asarray(devices[6:8]), ("fsdp",))               # other devices, split rows
    shardings = {"w": NamedSharding(mesh2, P("fsdp")), "opt": {
        "mu": NamedSharding(mesh2, P(None, "fsdp")), "count": NamedSharding(mesh2, P())}}
    ckpt = Checkpointer(str(tmp_path), keep=1)
    step, state, _ = ckpt.restore_latest(abstract_like(tree(0), shardings))
    ckpt.close()
    assert step == 1
    jax.tree.map(np.testing.assert_array_equal, state, tree(7))
    for arr, sh in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True):
        assert arr.sharding.is_equivalent_to(sh, arr.ndim)
    assert {s.data.shape for s in state["w"].addressable_shards} == {(4, 6)}


def test_bad_keep_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="keep_checkpoints"):
        Checkpointer(str(tmp_path), keep=0)
    assert not os.listdir(tmp_path)


def test_fsdp8_model_checkpoint_restores_on_fsdp2(tmp_path):
    """A tiny Llama's params + AdamW state saved sharded over fsdp=8 restore onto fsdp=2
    (other devices, other shards) with identical values and the fsdp=2 shardings."""
    import optax
    from flax import nnx

    import arch
    import sharding
    from configs.llama3 import get_config
    from trainer.checkpoint import train_state

    cfg = get_config("tiny").model
    cfg.update(d_model=64, num_layers=1, head_dim=16, mlp_dim=128)

    def build(mesh):
        model = arch.build_model(cfg, nnx.Rngs(params=3))
        opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
        sharding.shard_state(model, opt, mesh=mesh, rules=sharding.make_rules("fsdp"))
        return model, opt

    devices = jax.devices()
    mesh8 = sharding.make_mesh({"fsdp": 8}, devices)
    model8, opt8 = build(mesh8)
    src = train_state(model8, opt8, jax.random.key(0))
    embed8 = model8.embed.embedding[...]
    assert len({str(s.index) for s in embed8.addressable_shards}) == 8   # really split 8 ways
    ckpt = Checkpointer(str(tmp_path), keep=1)
    ckpt.save(1, src, {"row": 0})
    ckpt.close()

    mesh2 = sharding.make_mesh({"fsdp": 2}, devices[3:5])
    model2, opt2 = build(mesh2)
    target = train_state(model2, opt2, jax.random.key(1))
    shardings = sharding.state_shardings(target, mesh2, sharding.make_rules("fsdp"))
    ckpt = Checkpointer(str(tmp_path), keep=1)
    step, state, _ = ckpt.restore_latest(abstract_like(target, shardings))
    ckpt.close()
    assert step == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(src))
    nnx.update(model2, state["model"])
    embed2 = model2.embed.embedding[...]
    assert {d.id for d in embed2.devices()} == {d.id for d in devices[3:5]}
    assert len({str(s.index) for s in embed2.addressable_shards}) == 2
