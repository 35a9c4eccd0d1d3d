#!/usr/bin/env bash
# One-GPU check (fits 10 minutes on one H200), each part capped so a slow one cannot starve the next:
#   1. gpu_preflight.py: bf16 grouped_mm vs a per-expert loop, no host sync in the loop, compiled vs eager
#      and no recompiles at new depths (PASS/FAIL lines);
#   2. the headline: the 1B preset compiled, AC loop, depth 8 -> tokens/s/GPU, MFU, peak memory;
#   3. the eager sweep: `small` and 1B, AC none / loop, depth 4 / 8 / 16, next to the planner's predicted peak;
#   4. the planner's own tables for both configs on this GPU type.
# Logs go to $OUT (if set) or runs/gpu_check.
#
#   bash benchmarks/gpu_check.sh [extra gpu_check.py arguments for part 3, e.g. --steps 20]
#
# On the borrowed H200 (no network; its image has torch 2.11 + CUDA, pyarrow, sentencepiece, tensorboard, but no
# torchdata): first, here, `bash benchmarks/gpu_wheels.sh` (fills the git-ignored .whl/), then the device command
#   bash benchmarks/gpu_check.sh        with carry [".whl"]
# installs those wheels into /tmp/site before anything imports them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
LOG_DIR="${OUT:-runs/gpu_check}"
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/gpu_check.log"
GPU="${GPU_KIND:-h200}"
export PYTHONUNBUFFERED=1

{
  echo "== $(date -u +%FT%TZ) $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || echo "wheel install from .whl/ failed with $?"
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  # Caps add up to 480 s, below the 10-minute budget; every run prints as it finishes (unbuffered), so a cut
  # still reports. The compiled run's cold compile (about a minute) falls in its warm-up steps.
  timeout 120 "$PY" benchmarks/gpu_preflight.py || echo "gpu_preflight.py exited with $?"
  timeout 200 "$PY" benchmarks/gpu_check.py --out "$LOG_DIR" --compile --models 1b --policies loop --depths 8 --warmup 2 --steps 10 \
    || echo "compiled run exited with $?"
  timeout 160 "$PY" benchmarks/gpu_check.py --out "$LOG_DIR" --warmup 2 --steps 10 "$@" || echo "gpu_check.py exited with $?"
  for cfg in configs/small.toml configs/mythos_1b.toml; do
    echo "== plan $cfg on 1 x 1 $GPU (ep 1)"
    "$PY" -m mythos_train plan --config "$cfg" --nodes 1 --gpus-per-node 1 --gpu "$GPU" --parallel.ep=1 --no-alternatives || true
  done
} 2>&1 | tee "$LOG"
echo "log: $LOG"
