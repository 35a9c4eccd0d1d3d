#!/usr/bin/env bash
# Many nodes, elastic: run this same command on every node (SLURM: launch/slurm.sbatch does).
# usage: launch/multi_node.sh --nnodes MIN[:MAX] --rdzv-endpoint HOST:PORT --run-id ID [--nproc N] [--max-restarts R] \
#            --config configs/mythos_1b.toml [--section.field=value ...]
# The c10d rendezvous (hosted by the node whose name or address is HOST; no node ranks to assign) admits between
# MIN and MAX nodes. When a worker dies, its node's torchrun restarts the group (at most R times per node); when a
# node dies or joins, every node re-rendezvouses and restarts its workers. Each new group resumes from the newest
# complete checkpoint, resharded to the new world size, and the data stream continues where it stopped.
# SIGTERM, SIGINT or SIGUSR1: every rank finishes its step and saves, and this exits 75 (env.sh, run_torchrun).
# parallel.dp_replicate must divide the world size of every admissible node count (e.g. 1, or MIN = MAX).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
nproc=$NPROC_PER_NODE; nnodes=""; endpoint=""; run_id=""; max_restarts=${MAX_RESTARTS:-3}
while [[ $# -gt 0 ]]; do
    case $1 in
        --nnodes) nnodes=$2; shift 2 ;;
        --rdzv-endpoint) endpoint=$2; shift 2 ;;
        --run-id) run_id=$2; shift 2 ;;
        --nproc) nproc=$2; shift 2 ;;
        --max-restarts) max_restarts=$2; shift 2 ;;
        *) break ;;
    esac
done
if [[ -z $nnodes || -z $endpoint || -z $run_id ]]; then
    echo "multi_node.sh: --nnodes, --rdzv-endpoint and --run-id are required" >&2; exit 2
fi
# Check the config, data, paths and resume checkpoint once (for MIN nodes; the run-dir lock as this run's own):
# an error is reported here, not by every restart.
WORLD_SIZE=$(( nproc * ${nnodes%%:*} )) TORCHELASTIC_RUN_ID=$run_id "$PYTHON" -m mythos_train train --validate-only "$@"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(threads_per_process "$nproc")}
# last_call_timeout: once MIN nodes joined, wait this long for more (torch's default, 30 s, is paid on every
# rendezvous, restarts included). join_timeout: how long a node waits for MIN nodes before giving up.
run_torchrun --nnodes="$nnodes" --nproc_per_node="$nproc" \
    --rdzv-backend=c10d --rdzv-endpoint="$endpoint" --rdzv-id="$run_id" \
    --rdzv-conf="last_call_timeout=${LAST_CALL_TIMEOUT:-2},join_timeout=${JOIN_TIMEOUT:-600}" \
    --max-restarts="$max_restarts" -m mythos_train train "$@"
