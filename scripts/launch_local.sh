#!/usr/bin/env bash
# Start N processes of one training run on this machine, on CPU, and wait for them all.
#
#   scripts/launch_local.sh N --config=configs/llama3.py:tiny --workdir=runs/mp [flags...]
#
# Each process gets DEVICES_PER_PROCESS emulated CPU devices (default 2) and the flags
# --coordinator_address=localhost:PORT --num_processes=N --process_id=I after the given
# ones; the processes talk through gloo (trainer/distributed.py). The same pattern runs a
# real cluster: one process per host, the same command, the coordinator on host 0 (or
# --multihost alone where jax detects the cluster: Slurm, Open MPI, Cloud TPU pods).
# LAUNCH_PROGRAM (default train.py) is the Python script to start; PORT defaults to 12355.
# Exits with the first non-zero status among the processes (all are waited for).
set -u
if [ $# -lt 1 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N [flags for ${LAUNCH_PROGRAM:-train.py}...]  (N: number of processes)" >&2
  exit 2
fi
n=$1; shift
program=${LAUNCH_PROGRAM:-train.py}
port=${PORT:-12355}
python=${PYTHON:-python}
export JAX_PLATFORMS=cpu
export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-2}"
pids=()
for ((i = 0; i < n; i++)); do
  "$python" "$program" "$@" --coordinator_address="localhost:$port" --num_processes="$n" \
    --process_id="$i" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || { rc=$?; [ "$status" -eq 0 ] && status=$rc; }
done
exit "$status"
