"""Training checkpoints with orbax: async saves, keep-N, resume from the newest good one.

A checkpoint is one step directory `workdir/checkpoints/<step>/` with two items:
  state    the training state pytree: model variables, optimizer state (with its step
           count), the sampling rng (raw key data) — any tree of jax arrays
  loader   the data loader's position, JSON (data/loader.py `get_state()`)

Saves are asynchronous: `save` returns once the arrays are copied off the device, and
orbax writes them in a background thread into a temporary directory that it renames
into place when complete (then writes `commit_success.txt`). A crash mid-save leaves
only the temporary directory, which is never taken for a step.

Restoring takes the newest step. Before reading any array it compares the step's
metadata (every array's path and shape) with the state this run builds: a checkpoint
of another model or optimizer is refused with a ValueError that names the differing
arrays, and nothing is moved (trainer/workdir.py refuses a changed config even earlier,
by its fields). Only a step that is truly unreadable — not committed (no commit
marker), or files orbax cannot read (truncated, missing) — is reported with a warning
and, when it is the newest, moved aside to `<step>.corrupt` (never deleted: it is
evidence) so that the resumed run can save that step number again; the next older step
is then tried. A second unreadable step stops with a ValueError: two broken
checkpoints in a row mean something else is wrong, and nothing more is moved. keep-N
pruning (orbax `max_to_keep`) can so never remove the last good checkpoint in favour of
a broken one. `restore_latest(..., set_aside=False)` (sample.py) only skips.

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


def _path_str(path) -> str:
    names = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    if names and names[-1] == "value":   # nnx Variables: orbax records their `.value`
        names = names[:-1]
    return ".".join(names)


def _shape(x) -> tuple:
    dtype = getattr(x, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        x = jax.eval_shape(jax.random.key_data, x)  # orbax stores a key as its raw data
    return tuple(getattr(x, "shape", ()))


def _shapes(tree) -> dict[str, tuple]:
    return {_path_str(p): _shape(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def tree_differences(saved, target) -> list[str]:
    """'path: saved shape -> target shape' (or absent) for arrays that differ."""
    a, b = _shapes(saved), _shapes(target)
    out = []
    for k in sorted(a.keys() | b.keys()):
        if a.get(k) != b.get(k):
            out.append(f"{k}: {a.get(k, '(absent)')} -> {b.get(k, '(absent)')}")
    return out


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
        # Handlers named up front, so that a fresh manager can read a step's metadata.
        handlers = {"state": ocp.StandardCheckpointHandler(), "loader": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers=handlers)

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

    def restore_latest(self, abstract_state, *, set_aside: bool = True
                       ) -> tuple[int, object, dict] | None:
        """(step, state, loader_state) of the newest good checkpoint, or None if none.

        Raises ValueError if a checkpoint holds other arrays than `abstract_state`
        (another model or optimizer), or if a second unreadable step is met. An
        unreadable newest step is warned about (CheckpointWarning) and, with
        `set_aside`, moved to `<step>.corrupt`; without, only skipped.
        """
        self.manager.wait_until_finished()
        found, broken = None, []
        for step in sorted(self.manager.all_steps(), reverse=True):
            path = os.path.join(self.directory, str(step))
            problem = self._unreadable(step, path, abstract_state)
            if problem is None:
                try:
                    state, loader = self.restore(step, abstract_state)
                    found = (step, state, loader)
                    break
                except Exception as e:  # noqa: BLE001 - any read failure means unusable
                    problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if broken and set_aside:
                raise ValueError(
                    f"checkpoint steps {broken[0][0]} and {step} under {self.directory} are both "
                    f"unreadable ({broken[0][1]}; {problem}); {broken[0][2]} was set aside, "
                    "nothing else was moved. Inspect them, or train in a new workdir.")
            kept = self._set_aside(path) if set_aside else path
            broken.append((step, problem, kept))
            where = f"kept as {kept}" if set_aside else "left in place"
            warnings.warn(f"checkpoint step {step} at {path} is unusable ({problem}); {where} "
                          "and skipped in favour of an older one", CheckpointWarning, stacklevel=2)
        self.manager.reload()
        return found

    def _unreadable(self, step: int, path: str, abstract_state) -> str | None:
        """Why `step` cannot be read (None if it looks whole); ValueError if it holds
        other arrays than `abstract_state`."""
        if not is_committed(path):
            return f"no commit marker ({COMMIT_FILE})"
        try:
            saved = self.manager.item_metadata(step)["state"]
        except Exception as e:  # noqa: BLE001 - unreadable metadata: a broken step
            return f"metadata unreadable: {type(e).__name__}"
        if saved is None:
            return "metadata missing"
        diffs = tree_differences(saved, abstract_state)
        if diffs:
            raise ValueError(
                f"checkpoint step {step} at {path} holds other arrays than this run's model "
                f"and optimizer (saved -> now): {'; '.join(diffs[:8])}"
                + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
                + ". It was saved by another config; nothing was moved. Train this config in a "
                "new workdir (train.init_from=... starts it from that run's weights).")
        return None

    @staticmethod
    def _set_aside(path: str) -> str:
        from trainer.distributed import barrier
        target, n = path + ".corrupt", 1
        while os.path.exists(target):
            n += 1
            target = f"{path}.corrupt{n}"
        barrier("checkpoint_set_aside_name")   # every process has read the directory
        if jax.process_index() == 0:           # one process moves it, for all
            os.rename(path, target)
        barrier("checkpoint_set_aside_done")
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_model(cfg, workdir: str):
    """(model, step): the model of the newest good checkpoint of a train.py workdir.

    Builds model and optimizer from `cfg` (the config the run used) so that the
    checkpoint's tree matches, restores both, and returns the model. Reads only: an
    unreadable checkpoint is skipped, never moved.
    """
    import arch
    import optim
    model = arch.build_model(cfg.model, nnx.Rngs(params=cfg.seed))
    tx = optim.build_optimizer(cfg.optim, nnx.state(model, nnx.Param), total_steps=cfg.train.steps)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.train.keep_checkpoints)
    try:
        found = ckpt.restore_latest(abstract_like(train_state(model, optimizer, jax.random.key(0))),
                                    set_aside=False)
    finally:
        ckpt.close()
    if found is None:
        raise ValueError(f"{workdir=} holds no usable checkpoint under checkpoints/")
    step, state, _ = found
    nnx.update(model, state["model"])
    return model, step


def init_from(model, cfg, source: str) -> int:
    """Load the weights of `source`'s newest good checkpoint into `model`; returns its step.

    `source` is another train.py workdir (train.init_from); its config.json rebuilds the
    tree its checkpoint holds (its optimizer may differ from this run's). Parameters and
    other model variables are copied; the dropout RNG streams stay this run's.
    """
    import ml_collections as mlc

    from trainer.workdir import check_init_from, read_config
    check_init_from(cfg, source)
    src_cfg = mlc.ConfigDict(read_config(source))
    src_model, step = restore_model(src_cfg, source)
    nnx.update(model, nnx.state(src_model, nnx.Not(nnx.RngState)))
    return step
