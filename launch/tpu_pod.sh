#!/usr/bin/env bash
# TPU v5e pod slice: create it, install this package on every worker, run the SAME command on
# every worker (jax.distributed.initialize() is called automatically on TPU pods), collect logs.
#
#   launch/tpu_pod.sh create  NAME ZONE [ACCELERATOR=v5litepod-64] [VERSION=v2-alpha-tpuv5-lite]
#   launch/tpu_pod.sh install NAME ZONE                 # copies this checkout, pip installs it
#   launch/tpu_pod.sh aot     NAME ZONE CONFIG [--config.x=y ...]   # compile-only, memory check
#   launch/tpu_pod.sh train   NAME ZONE CONFIG WORKDIR [--config.x=y ...]
#   launch/tpu_pod.sh logs    NAME ZONE WORKDIR         # fetch every worker's log
#   launch/tpu_pod.sh delete  NAME ZONE
#
# WORKDIR should be a path every worker can write to (a gs:// bucket, or a shared filesystem):
# Orbax writes one checkpoint from all hosts. Weights and tokenizer for --config.init and
# --config.tokenizer must be readable from every worker too. Rerunning `train` with the same
# WORKDIR resumes from the latest checkpoint.
set -euo pipefail
cmd=${1:?usage: see the header of this script}
name=${2:?TPU name}
zone=${3:?zone}
shift 3
ssh_all() { gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$1"; }

case "$cmd" in
  create)
    accel=${1:-v5litepod-64}; version=${2:-v2-alpha-tpuv5-lite}
    gcloud compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$accel" \
      --version="$version"
    ;;
  install)
    tarball=$(mktemp --suffix=.tar.gz)
    git archive --format=tar.gz -o "$tarball" HEAD
    gcloud compute tpus tpu-vm scp "$tarball" "$name":~/matquant_jax.tar.gz --zone="$zone" --worker=all
    ssh_all 'rm -rf ~/matquant_jax && mkdir ~/matquant_jax && tar -xzf ~/matquant_jax.tar.gz -C ~/matquant_jax &&
             cd ~/matquant_jax && python3 -m pip install -q -e . && python3 -m pip install -q -U "jax[tpu]"'
    ;;
  aot)
    config=${1:?config}; shift
    # Compiles the train step for the slice's real topology (every worker takes part) and
    # prints the per-device memory XLA plans, without touching weights or data.
    ssh_all "cd ~/matquant_jax && python3 -m matquant_jax.train --config=$config \
             --workdir=/tmp/aot --config.aot_only=True $*"
    ;;
  train)
    config=${1:?config}; workdir=${2:?workdir}; shift 2
    ssh_all "cd ~/matquant_jax && nohup python3 -m matquant_jax.train --config=$config \
             --workdir=$workdir $* > ~/train.log 2>&1 &"
    echo "started on every worker; follow with: $0 logs $name $zone $workdir"
    ;;
  logs)
    out=${1:-logs}; mkdir -p "logs/$name"
    n=$(gcloud compute tpus tpu-vm describe "$name" --zone="$zone" --format='value(networkEndpoints.len())' 2>/dev/null || echo 1)
    for ((w = 0; w < ${n:-1}; w++)); do
      gcloud compute tpus tpu-vm scp "$name":~/train.log "logs/$name/worker$w.log" --zone="$zone" --worker=$w || true
    done
    tail -n 5 "logs/$name/worker0.log"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$name" --zone="$zone" --quiet
    ;;
  *)
    echo "unknown command $cmd; see the header of $0" >&2; exit 2;;
esac
