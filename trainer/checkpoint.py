"""Training checkpoints with orbax: async saves, keep-N, resume from the newest good one.

A checkpoint is one step directory `workdir/checkpoints/<step>/` with two items:
  state    the training state pytree: model variables, optimizer state (with its step
           count), the sampling rng (raw key data) — any tree of jax arrays
  loader   the data loader's position, JSON (data/loader.py `get_state()`)

Saves are asynchronous: `save` returns once the arrays are copied off the device, and
orbax writes them in a background thread into a temporary directory that it renames
into place when complete (then writes `commit_success.txt`). A crash mid-save leaves
only the temporary directory, which is never taken for a step.

Restoring walks the steps from newest to oldest. A step that is not committed (no
commit marker) or that orbax cannot read (truncated or damaged files) is reported with
a warning and moved aside to `<step>.corrupt` (never deleted: it is evidence) so that
the resumed run can save that step number again; the next older step is tried. Only
complete steps therefore remain, and keep-N pruning (orbax `max_to_keep`) can never
remove the last good checkpoint in favour of a broken one.

Restoring takes the *target* of every array (`jax.ShapeDtypeStruct` with a sharding),
so a checkpoint saved on one mesh restores onto another: orbax reads each device's
slice directly.

    >>> ckpt = Checkpointer(f"{workdir}/checkpoints", keep=3)
    >>> ckpt.save(100, state, loader.get_state())
    >>> found = ckpt.restore_latest(abstract_state)   # None, or (step, state, loader_state)
    >>> ckpt.close()                                  # waits for pending saves
    >>> model, step = restore_model(cfg, workdir)     # a trained model, e.g. to sample from
"""
from __future__ import annotations

import json
import os
import warnings

import jax
import orbax.checkpoint as ocp
from flax import nnx

COMMIT_FILE = "commit_success.txt"       # orbax's commit marker (atomicity.COMMIT_SUCCESS_FILE)
STEP_METADATA = "_CHECKPOINT_METADATA"   # orbax's per-step metadata, with commit time


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped because it is incomplete or unreadable."""


def abstract_like(tree, shardings=None):
    """ShapeDtypeStructs of `tree`'s arrays, with `shardings` (a matching tree) or theirs."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def train_state(model, optimizer, rng) -> dict:
    """The pytree a training checkpoint holds (the one layout train.py saves and restores)."""
    return {"model": nnx.state(model), "optimizer": nnx.state(optimizer),
            "rng": jax.random.key_data(rng)}


def is_committed(step_dir: str) -> bool:
    """True if orbax finished writing this step directory."""
    if os.path.exists(os.path.join(step_dir, COMMIT_FILE)):
        return True
    # Older orbax versions commit by rename only and record the time in the metadata.
    try:
        with open(os.path.join(step_dir, STEP_METADATA)) as f:
            return json.load(f).get("commit_timestamp_nsecs") is not None
    except (OSError, ValueError):
        return False


class Checkpointer:
    """Saves and restores (state, loader state) per step under `directory`.

    Args:
      directory: where the step directories go (created if missing).
      keep: how many of the newest checkpoints to keep.
      async_save: write in a background thread (False: `save` blocks until written).
    """

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"{keep=} must be an int >= 1 (train.keep_checkpoints)")
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "loader"))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, loader_state: dict) -> None:
        """Start saving `state` and `loader_state` as `step` (returns before the write ends)."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  loader=ocp.args.JsonSave(loader_state))
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state) -> tuple:
        """(state, loader_state) of `step`, arrays placed as `abstract_state` says."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  loader=ocp.args.JsonRestore())
        out = self.manager.restore(step, args=args)
        return out.state, out.loader

    def restore_latest(self, abstract_state) -> tuple[int, object, dict] | None:
        """(step, state, loader_state) of the newest good checkpoint, or None if none.

        Broken steps on the way are warned about (CheckpointWarning) and moved aside.
        """
        self.manager.wait_until_finished()
        found = None
        for step in sorted(self.manager.all_steps(), reverse=True):
            path = os.path.join(self.directory, str(step))
            if not is_committed(path):
                problem = f"no commit marker ({COMMIT_FILE})"
            else:
                try:
                    state, loader = self.restore(step, abstract_state)
                    found = (step, state, loader)
                    break
                except Exception as e:  # noqa: BLE001 - any read failure means unusable
                    problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            moved = self._set_aside(path)
            warnings.warn(f"checkpoint step {step} at {path} is unusable ({problem}); kept as "
                          f"{moved} and skipped in favour of an older one", CheckpointWarning,
                          stacklevel=2)
        self.manager.reload()
        return found

    @staticmethod
    def _set_aside(path: str) -> str:
        target, n = path + ".corrupt", 1
        while os.path.exists(target):
            n += 1
            target = f"{path}.corrupt{n}"
        os.rename(path, target)
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_model(cfg, workdir: str):
    """(model, step): the model of the newest good checkpoint of a train.py workdir.

    Builds model and optimizer from `cfg` (the config the run used) so that the
    checkpoint's tree matches, restores both, and returns the model.
    """
    import arch
    import optim
    model = arch.build_model(cfg.model, nnx.Rngs(params=cfg.seed))
    tx = optim.build_optimizer(cfg.optim, nnx.state(model, nnx.Param), total_steps=cfg.train.steps)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.train.keep_checkpoints)
    try:
        found = ckpt.restore_latest(abstract_like(train_state(model, optimizer, jax.random.key(0))))
    finally:
        ckpt.close()
    if found is None:
        raise ValueError(f"{workdir=} holds no usable checkpoint under checkpoints/")
    step, state, _ = found
    nnx.update(model, state["model"])
    return model, step
