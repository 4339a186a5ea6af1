#!/usr/bin/env bash
# One machine: train, resuming if the workdir has checkpoints.
#
#   launch/local.sh configs/tiny_qat.py [workdir] [--config.field=value ...]
#
# A simulated pod: NPROC processes on this machine, each with its own CPU devices, joined by
# jax.distributed (gloo collectives), exactly as the workers of a TPU pod slice run:
#
#   NPROC=2 DEVICES_PER_PROC=4 launch/local.sh configs/tiny_qat.py runs/pod \
#       --config.mesh.fsdp=2 --config.data.num_shards=2
#
# (data.num_shards=2 makes the run's batches equal those of a 1-process run with the same
# setting.) Process i logs to <workdir>/train.<i>.log; process 0 also to the console.
# On a GPU host install the CUDA build of jax first (pip install -U "jax[cuda12]"); the same
# code runs unchanged. TensorBoard: tensorboard --logdir <workdir>/tensorboard
set -euo pipefail
config=${1:?usage: [NPROC=n] launch/local.sh CONFIG [WORKDIR] [--config.x=y ...]}
shift
workdir="runs/$(basename "${config%%:*}" .py)"
if [[ $# -gt 0 && $1 != --* ]]; then workdir=$1; shift; fi
mkdir -p "$workdir"
nproc=${NPROC:-1}
if [[ $nproc -le 1 ]]; then
  python -m matquant_jax.train --config="$config" --workdir="$workdir" "$@" 2>&1 | tee -a "$workdir/train.log"
  exit "${PIPESTATUS[0]}"
fi

port=${COORDINATOR_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROC:-4} ${XLA_FLAGS:-}"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < nproc; i++)); do
  python -m matquant_jax.train --config="$config" --workdir="$workdir" "$@" \
      --coordinator="127.0.0.1:$port" --num_processes="$nproc" --process_id="$i" \
      >"$workdir/train.$i.log" 2>&1 &
  pids+=($!)
done
tail -n +1 -f "$workdir/train.0.log" --pid="${pids[0]}" &
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
