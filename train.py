"""Train a language model from a config file.

    python train.py --config=configs/llama3.py:tiny --workdir=runs/tiny
    python train.py --config=configs/llama3.py:tiny --workdir=runs/lr1e-3 --config.optim.lr=1e-3

The loop is flat, in the order nanoGPT's reads: check the config, load the data,
build model and optimizer, resume from the newest good checkpoint, then per step:
batch -> train_step -> log -> eval -> checkpoint. At the end: a last evaluation
(validation loss, perplexity, bits per byte), a loss plot and a sample of text.

What lands in the workdir:
    checkpoints/<step>/   orbax checkpoints (keep train.keep_checkpoints; see trainer/checkpoint.py)
    metrics.jsonl         one JSON record per log / eval (trainer/metrics.py)
    loss.png              train and validation loss (if matplotlib is installed)
    config.json           the run's config (trainer/workdir.py: a resume may change only
                          what does not touch the checkpoints or the data stream)
    tensorboard/          event files (if tensorboardX is installed)

Everything is checked before anything is computed or written: a bad config raises
ValueError naming the field, and the workdir is left as it was. Running again with
the same workdir resumes; a config that does not fit the workdir's checkpoints is
refused (use a new workdir, optionally with train.init_from=OLD_WORKDIR). A
non-finite loss stops the run before it saves anything past the last good checkpoint. SIGTERM or Ctrl-C stops at the next step boundary with a
checkpoint. From Python (a notebook):

    from configs.llama3 import get_config
    from train import train_and_evaluate
    result = train_and_evaluate(get_config("tiny"), "runs/tiny")
    result["val_bits_per_byte"], result["sample"]
"""
from __future__ import annotations

import math
import os
import sys
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

import arch
import data
import optim
import sharding
from trainer import distributed
from trainer.checkpoint import Checkpointer, abstract_like, init_from, train_state
from trainer.config import ConfigError, check_config, check_data
from trainer.mesh import device_batch, setup
from trainer.metrics import MetricsWriter, plot_losses, read_metrics
from trainer.mfu import flops_per_token, format_mfu, mfu
from trainer.sample import generate
from trainer.signals import StopOnSignal
from trainer.step import StepOptions, bind_eval_step, bind_train_step
from trainer.workdir import CONFIG_FILE, check_workdir, checkpoint_steps


def evaluate(model, ds, mesh, rules, num_batches: int) -> dict:
    """Validation loss (nats/token), perplexity and bits per byte over `num_batches`."""
    ce_sum = tokens = 0.0
    step = bind_eval_step(model)
    for batch in ds.eval_batches(num_batches, process_index=jax.process_index(),
                                 process_count=jax.process_count()):
        out = jax.device_get(step(device_batch(batch, mesh, rules)))
        ce_sum += float(out["ce_sum"])
        tokens += float(out["tokens"])
    loss = ce_sum / max(tokens, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "bits_per_byte": ds.bits_per_byte(loss), "tokens": tokens}


def dropout_key(seed: int):
    """The dropout stream's key: XLA's RngBitGenerator ("unsafe_rbg") rather than the
    default threefry, whose counter hashing dominated small models' steps on a GPU;
    deterministic and checkpointed all the same."""
    return jax.random.key(seed, impl="unsafe_rbg")


def load_and_check(config, workdir: str | None = None):
    """Every check, then the data, then the workdir's own config (trainer/workdir.py);
    ConfigError (a ValueError) before anything is computed or written."""
    try:
        check_config(config)
        ds = data.build_dataset(config.data)
        check_data(config, ds)
        if workdir is not None:
            check_workdir(config, workdir)
        return ds
    except ValueError as e:
        raise ConfigError(str(e)) from e


def train_and_evaluate(config, workdir: str, *, stop_after: int | None = None,
                       progress: bool = True) -> dict:
    """Train `config` in `workdir` (resuming if it holds checkpoints), evaluate, sample.

    Args:
      config: a full config (configs/<family>.py `get_config(...)`).
      workdir: where checkpoints, metrics and plots go.
      stop_after: stop after this many steps *of this call*, with a checkpoint, as a
        SIGTERM would (train in slices, e.g. in a notebook); None: run to train.steps.
      progress: show a progress bar.

    Returns:
      dict: step, stopped (True if stopped early), train_loss (mean of the last log
      interval), val_loss, val_perplexity, val_bits_per_byte, sample (text or None),
      tokens_per_s, mfu (None where the device peak is unknown).
    """
    cfg, t = config, config.train
    ds = load_and_check(cfg, workdir)            # nothing computed or written before this
    distributed.barrier("checked")               # all have read the workdir before any writes
    mesh, rules = setup(cfg)
    model = arch.build_model(cfg.model, nnx.Rngs(params=cfg.seed, dropout=dropout_key(cfg.seed + 1)))
    tx = optim.build_optimizer(cfg.optim, nnx.state(model, nnx.Param), total_steps=t.steps)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    sharding.shard_state(model, optimizer, mesh=mesh, rules=rules)
    opts = StepOptions.from_config(cfg)
    loader = ds.train_loader(seed=cfg.seed, process_index=jax.process_index(),
                             process_count=jax.process_count())
    # Replicated over the mesh: a checkpoint of several processes takes only global arrays.
    rng = jax.jit(lambda: jax.random.key(cfg.seed), out_shardings=NamedSharding(mesh, PartitionSpec()))()

    start = 0
    state = train_state(model, optimizer, rng)
    abstract = abstract_like(state, sharding.state_shardings(state, mesh, rules))
    ckpt = None
    if checkpoint_steps(workdir):
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints)
        try:
            found = ckpt.restore_latest(abstract)
        except ValueError as e:
            ckpt.close()
            raise ConfigError(str(e)) from e
        if found is None:
            ckpt.close()
            raise ConfigError(f"--workdir={workdir} holds no usable checkpoint (the unreadable "
                              "newest one was set aside; see the warning); train in a new workdir")
        start, restored, loader_state = found
        nnx.update(model, restored["model"])
        nnx.update(optimizer, restored["optimizer"])
        rng = jax.random.wrap_key_data(restored["rng"])
        try:
            loader.set_state(loader_state)
        except ValueError as e:
            ckpt.close()
            raise ConfigError(str(e)) from e
    elif t.get("init_from"):
        step0 = init_from(model, cfg, t.init_from)
        sharding.shard_state(model, mesh=mesh, rules=rules)
        print(f"initialised from {t.init_from} (step {step0}); optimizer and data start afresh")
    del state
    step_fn = bind_train_step(model, optimizer)  # after restore/init_from: the final graph
    # Only now, every check passed, does the workdir change.
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
            f.write(cfg.to_json_best_effort(indent=2))
    if ckpt is None:
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints)

    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    flops_tok = flops_per_token(cfg.model, cfg.data.seq_len)
    device_kind = mesh.devices.flat[0].device_kind
    writer = MetricsWriter(workdir) if jax.process_index() == 0 else None
    total, active = arch.count_params(cfg.model)
    print(f"model: {total / 1e6:.2f}M parameters ({active / 1e6:.2f}M active), "
          f"{flops_tok / 1e6:.1f} MFLOPs/token; {mesh.size} x {device_kind}; "
          + (f"resuming at step {start}" if start else "starting at step 0"))

    def log(step, split, metrics):
        if writer is not None:
            writer.write(step, split, metrics)

    def plot():
        if writer is not None:
            plot_losses(read_metrics(writer.path), os.path.join(workdir, "loss.png"),
                        title=f"{cfg.model.family} {total / 1e6:.1f}M")

    schedule = optim.build_schedule(cfg.optim, cfg.optim.lr, t.steps)  # for the log only
    bar = tqdm(total=t.steps, initial=start, disable=not progress, dynamic_ncols=True)
    pending, last = [], {}
    speed = {"tokens_per_s": None, "mfu": None}
    timer_steps, timer = 0, None
    step, stopped = start, False
    multi_process = jax.process_count() > 1
    try:
        with StopOnSignal() as stop, sharding.activate(mesh, rules):
            for step in range(start + 1, t.steps + 1):
                batch = device_batch(next(loader), mesh, rules)
                pending.append(step_fn(batch, opts=opts))
                if timer is None:  # the first step compiles: time from its end
                    jax.block_until_ready(pending[-1])
                    timer, timer_steps = time.perf_counter(), 0
                else:
                    timer_steps += 1
                if stop_after is not None and step - start >= stop_after:
                    stop.request()
                scheduled_save = bool(t.checkpoint_every) and step % t.checkpoint_every == 0
                scheduled_log = step % t.log_every == 0
                # Read the stop flag once per step: a signal that lands later in this step
                # is handled at the next boundary, after this step's checkpoint decision.
                stopping = stop.requested
                if multi_process:  # a signal on one host stops all at the same step
                    check = (step % t.stop_check_every == 0 or scheduled_save or scheduled_log
                             or step == t.steps)
                    stopping = check and distributed.any_process(stopping)
                done = step == t.steps or stopping
                saving = scheduled_save or done
                logging_now = scheduled_log or done
                if logging_now or saving:
                    fetched = jax.device_get(pending)
                    # Never save (or go on) past a non-finite loss: the last checkpoint stays good.
                    check_finite([m["loss"] for m in fetched], step, ckpt)
                if logging_now:
                    last = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
                    pending = []
                    if timer_steps:
                        tps = timer_steps * tokens_per_step / (time.perf_counter() - timer)
                        speed = {"tokens_per_s": tps,
                                 "mfu": mfu(tps, flops_tok, device_kind, mesh.size)}
                    # The optimizer's count before this update was step - 1.
                    log(step, "train", {**last, "lr": float(schedule(step - 1)), **speed})
                    bar.set_postfix(loss=f"{last['loss']:.3f}",
                                    tok_s=_fmt(speed["tokens_per_s"], "{:,.0f}"),
                                    mfu=format_mfu(speed["mfu"]), refresh=False)
                    timer, timer_steps = time.perf_counter(), 0
                bar.update(1)
                if t.eval_every and step % t.eval_every == 0 and not done:
                    ev = evaluate(model, ds, mesh, rules, t.eval_batches)
                    log(step, "eval", ev)
                    bar.write(f"step {step}: validation loss {ev['loss']:.4f}, "
                              f"bits/byte {_fmt(ev['bits_per_byte'])}")
                    plot()
                    timer, timer_steps = time.perf_counter(), 0
                if saving:
                    ckpt.save(step, train_state(model, optimizer, rng), loader.get_state())
                    timer, timer_steps = time.perf_counter(), 0
                if stopping:
                    stopped = True
                    break
    finally:
        bar.close()
        ckpt.close()   # waits for the last save, also after an exception
    result = {"step": step, "stopped": stopped, "train_loss": last.get("loss"),
              "val_loss": None, "val_perplexity": None, "val_bits_per_byte": None,
              "sample": None, **speed}
    if stopped:
        print(f"stopped at step {step}: checkpoint saved in {ckpt.directory}")
    else:
        with sharding.activate(mesh, rules):
            ev = evaluate(model, ds, mesh, rules, t.eval_batches)
        log(step, "eval", ev)
        result.update(val_loss=ev["loss"], val_perplexity=ev["perplexity"],
                      val_bits_per_byte=ev["bits_per_byte"])
        if t.sample_tokens:
            rng, key = jax.random.split(rng)
            ids = generate(model, ds.tokenizer.encode(t.sample_prompt),
                           max_new_tokens=t.sample_tokens,
                           temperature=float(t.get("sample_temperature", 0.0)), rng=key)
            result["sample"] = ds.tokenizer.decode(ids)
            print(f"--- sample (prompt {t.sample_prompt!r}) ---\n{result['sample']}\n---")
        print(f"step {step}: train loss {_fmt(result['train_loss'])}, validation loss "
              f"{ev['loss']:.4f} (perplexity {ev['perplexity']:.2f}), "
              f"{_fmt(speed['tokens_per_s'], '{:,.0f}')} tokens/s, MFU {format_mfu(speed['mfu'])}")
        print(f"validation bits/byte: {_fmt(ev['bits_per_byte'])}")
    plot()
    if writer is not None:
        writer.close()
    return result


class NonFiniteLoss(FloatingPointError):
    """The training loss became NaN or infinite; the run stopped without saving."""


def check_finite(losses, step: int, ckpt) -> None:
    """NonFiniteLoss if any of the steps' losses (host values, ending at `step`) is not finite."""
    values = np.asarray(losses, np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        first = step - len(values) + 1 + int(bad[0])
        ckpt.wait()
        steps = ckpt.steps()
        last = f"step {steps[-1]} in {ckpt.directory}" if steps else "none"
        raise NonFiniteLoss(
            f"training loss is {values[bad[0]]} at step {first}: stopped, nothing saved after "
            f"it (last good checkpoint: {last}). Lower optim.lr, raise optim.warmup_steps or "
            "check the data, then run again to resume from that checkpoint.")


def _fmt(x, spec: str = "{:.4f}") -> str:
    return "n/a" if x is None else spec.format(x)


def parse_flags(argv):
    """absl's flag parsing, with a mistyped `--config.a.b` as a one-line config error."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError, TypeError) as e:  # from ml_collections' override
        overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        msg = " ".join(str(e).replace("\\'", "'").strip("'\"").replace("\\n", " ").replace("\n", " ").split())
        print(f"train.py: config error: {msg} (overrides: {', '.join(overrides)}); "
              "configs/base.py lists every field", file=sys.stderr)
        sys.exit(2)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        # absl shows INFO under app.run, and orbax logs every save at INFO.
        logging.set_verbosity(logging.WARNING)
    try:
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                               auto=_MULTIHOST.value)
    except ValueError as e:
        print(f"train.py: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value, progress=jax.process_index() == 0)
    except ConfigError as e:
        print(f"train.py: config error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLoss as e:
        print(f"train.py: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    from absl import app, flags, logging
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "config file and variant, e.g. configs/llama3.py:tiny")
    _WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints and metrics")
    # Several processes (trainer/distributed.py): the same command on every host.
    _COORDINATOR = flags.DEFINE_string(
        "coordinator_address", None, "HOST:PORT of process 0 (or JAX_COORDINATOR_ADDRESS)")
    _NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                          "processes in the run (or JAX_NUM_PROCESSES)")
    _PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                       "this process, 0..N-1 (or JAX_PROCESS_ID)")
    _MULTIHOST = flags.DEFINE_bool("multihost", False, "join the run of a cluster jax detects "
                                   "(Slurm, Open MPI, Cloud TPU pods) without the flags above")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=parse_flags)
