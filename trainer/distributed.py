"""One run over several processes (hosts): joining it, and deciding together.

Every peer (MaxText, torchtitan, nanoGPT's DDP) runs one process per host, each with the
same command; the processes find each other through a coordinator (process 0's address).
`initialize` joins such a run from, in this order:

  flags      --coordinator_address=HOST:PORT --num_processes=N --process_id=I (train.py)
  env vars   JAX_COORDINATOR_ADDRESS (read by jax), JAX_NUM_PROCESSES, JAX_PROCESS_ID
  a cluster  --multihost alone: jax detects Slurm, Open MPI, Cloud TPU pod slices and
             GKE from their environment (jax.distributed.initialize() without arguments)

and is a no-op when none is given (one process). On CPU the processes' collectives go
through gloo, so `scripts/launch_local.sh N` can run N processes on one machine.

After it, `jax.devices()` lists every process's devices: the mesh (trainer/mesh.py)
spans them all, each process loads only its rows (data/loader.py), and
`sharding.shard_batch` assembles the global batch with
`jax.make_array_from_process_local_data`. Orbax saves each process's shards of a
checkpoint; process 0 writes what is shared (config.json, metrics, the JSON loader state).

Decisions that one process alone may reach (a SIGTERM lands on one host) are taken
together with `any_process`: a collective, so every process must call it at the same
steps, and each returns the same answer.
"""
from __future__ import annotations

import os

import jax
import numpy as np

ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an int") from None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False) -> bool:
    """Join the multi-process run described by the arguments or the environment.

    Returns True if this process joined a run of several processes, False for a single
    process (nothing done). ValueError for a partial or inconsistent description.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None:
        num_processes = _env_int(ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _env_int(ENV_PROCESS_ID)
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    if all(v is None for v in given.values()) and not auto:
        return False
    if not auto:
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise ValueError(f"a multi-process run needs coordinator_address, num_processes and "
                             f"process_id (flags, or {ENV_NUM_PROCESSES}/{ENV_PROCESS_ID} and "
                             f"JAX_COORDINATOR_ADDRESS); missing {missing}. On a cluster jax "
                             "detects (Slurm, MPI, TPU pods), pass --multihost alone.")
    if num_processes is not None and (num_processes < 1 or not (
            process_id is None or 0 <= process_id < num_processes)):
        raise ValueError(f"process_id={process_id} must lie in [0, num_processes={num_processes})")
    if num_processes == 1:
        return False
    try:  # CPU processes talk through gloo (the GPU and TPU clients ignore this)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):
        pass
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return jax.process_count() > 1


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is True on any: a collective (call it everywhere)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.asarray([bool(flag)], np.int32))
    return bool(np.asarray(flags).any())


def barrier(name: str) -> None:
    """Wait until every process reaches this point (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
