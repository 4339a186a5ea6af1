#!/usr/bin/env bash
# Single host (CPU or GPU): train, resuming if the workdir has checkpoints.
#
#   launch/local.sh configs/tiny_qat.py [workdir] [--config.field=value ...]
#
# On a GPU host install the CUDA build of jax first (pip install -U "jax[cuda12]"); the same
# code runs unchanged. Logs go to <workdir>/train.log as well as the console; TensorBoard:
#   tensorboard --logdir <workdir>/tensorboard
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG [WORKDIR] [--config.x=y ...]}
shift
workdir="runs/$(basename "${config%%:*}" .py)"
if [[ $# -gt 0 && $1 != --* ]]; then workdir=$1; shift; fi
mkdir -p "$workdir"
python -m matquant_jax.train --config="$config" --workdir="$workdir" "$@" 2>&1 | tee -a "$workdir/train.log"
