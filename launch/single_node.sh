#!/usr/bin/env bash
# One node: N processes (one per GPU, or 2 gloo processes on a CPU-only machine). When a process dies (crash,
# OOM kill, SIGKILL), torchrun stops the others and starts the group again, up to --max-restarts times; the
# trainer then resumes from the newest complete checkpoint. SIGTERM, SIGINT or SIGUSR1: every rank finishes its
# step and saves, and this exits 75 (launch/env.sh, run_torchrun).
# usage: launch/single_node.sh [--nproc N] [--max-restarts R] --config configs/debug.toml [--section.field=value ...]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
nproc=$NPROC_PER_NODE
max_restarts=${MAX_RESTARTS:-3}
while [[ $# -gt 0 ]]; do
    case $1 in
        --nproc) nproc=$2; shift 2 ;;
        --max-restarts) max_restarts=$2; shift 2 ;;
        *) break ;;
    esac
done
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(threads_per_process "$nproc")}
# Check the config, data, paths and resume checkpoint once: an error is reported here, not by every restart.
WORLD_SIZE=$nproc "$PYTHON" -m mythos_train train --validate-only "$@"
# --standalone: a c10d rendezvous on a free local port, so several jobs can share the machine.
run_torchrun --standalone --nproc_per_node="$nproc" --max-restarts="$max_restarts" -m mythos_train train "$@"
