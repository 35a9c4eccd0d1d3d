#!/usr/bin/env bash
# One node: N processes (GPU count, or 2 gloo processes on a CPU-only machine).
# usage: launch/single_node.sh [--nproc N] [--max-restarts R] --config configs/debug.toml [--section.field=value ...]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/env.sh"
nproc=$GPUS_PER_NODE
max_restarts=${MAX_RESTARTS:-3}
while [[ $# -gt 0 ]]; do
    case $1 in
        --nproc) nproc=$2; shift 2 ;;
        --max-restarts) max_restarts=$2; shift 2 ;;
        *) break ;;
    esac
done
PYTHON=${PYTHON:-python3}
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$nproc" --max-restarts="$max_restarts" \
    -m mythos_train train "$@"
