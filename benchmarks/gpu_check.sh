#!/usr/bin/env bash
# One-GPU check (fits 10 minutes on one H200): the `small` config and the 1B preset, activation checkpointing
# none / loop, loop depth 4 / 8 / 16; prints tokens/s/GPU, MFU, peak memory and the planner's predicted peak,
# then the planner's own tables for both configs on this GPU type. Logs go to $OUT (if set) or runs/gpu_check.
#
#   bash benchmarks/gpu_check.sh [extra gpu_check.py arguments, e.g. --steps 20]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
LOG_DIR="${OUT:-runs/gpu_check}"
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/gpu_check.log"
GPU="${GPU_KIND:-h200}"

{
  echo "== $(date -u +%FT%TZ) $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  # Hard cap below the 10-minute budget; gpu_check.py prints each run as it finishes, so a cut still reports.
  timeout 480 "$PY" benchmarks/gpu_check.py --out "$LOG_DIR" "$@" || echo "gpu_check.py exited with $?"
  for cfg in configs/small.toml configs/mythos_1b.toml; do
    echo "== plan $cfg on 1 x 1 $GPU (ep 1)"
    "$PY" -m mythos_train plan --config "$cfg" --nodes 1 --gpus-per-node 1 --gpu "$GPU" --parallel.ep=1 --no-alternatives || true
  done
} 2>&1 | tee "$LOG"
echo "log: $LOG"
