#!/usr/bin/env bash
# Many nodes, elastic: run this same command on every node.
# usage: launch/multi_node.sh --nnodes MIN[:MAX] --rdzv-endpoint HOST:PORT --run-id ID [--nproc N] [--max-restarts R] \
#            --config configs/mythos_1b.toml [--section.field=value ...]
# The c10d rendezvous (no fixed master) admits between MIN and MAX nodes; when a node dies, the others
# re-rendezvous, torchrun restarts every worker, and the trainer resumes from the newest complete
# checkpoint, resharding to the new world size. Set parallel.dp_replicate to the node count for HSDP.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/env.sh"
nproc=$GPUS_PER_NODE; nnodes=""; endpoint=""; run_id=""; max_restarts=${MAX_RESTARTS:-3}
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
PYTHON=${PYTHON:-python3}
# last_call_timeout: once MIN nodes joined, wait only this long for stragglers (the default adds 30 s per rendezvous).
exec "$PYTHON" -m torch.distributed.run --nnodes="$nnodes" --nproc_per_node="$nproc" \
    --rdzv-backend=c10d --rdzv-endpoint="$endpoint" --rdzv-id="$run_id" \
    --rdzv-conf="last_call_timeout=${LAST_CALL_TIMEOUT:-2},join_timeout=${JOIN_TIMEOUT:-600}" \
    --max-restarts="$max_restarts" -m mythos_train train "$@"
