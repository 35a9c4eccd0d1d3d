#!/usr/bin/env bash
# GPU check, one command, under 10 minutes on one H200; every part capped (so a slow one cannot starve the next)
# and ends with one line, PASS or FAIL, with its figure:
#   torch      the torch that runs, against the version pyproject.toml pins;
#   preflight  gpu_preflight.py: bf16 grouped_mm vs a per-expert loop, no host sync in the loop, compiled vs eager
#              and no recompiles at new depths (its own PASS/FAIL line per check);
#   compiled   the 1B preset compiled, AC loop, depth 8 -> tokens/s/GPU, MFU, peak memory;
#   sweep      eager `small` and 1B, AC none / loop, depth 4 / 8 / 16, next to the planner's predicted peak;
#   multi-GPU  with 2+ GPUs only: FSDP2 over all of them, then expert parallelism 2 (gpu_multi.py under torchrun);
#   plan       the planner's tables for both configs on this GPU type;
#   bench      `python -m mythos_train bench --floor`: the bench shape (fp32, 8 loops, so our experts take torch's
#              per-expert fp32 grouped_mm) against open-mythos 0.5.0 at the same depth (required: from .whl/), and each
#              model's kernel floor (issue 18's target, measured so far on CPU only).
# Logs go to $OUT (if set) or runs/gpu_check; a summary of the PASS/FAIL lines ends the log.
#
#   bash benchmarks/gpu_check.sh [extra gpu_check.py arguments for the sweep, e.g. --steps 20]
#   DRY_RUN=1 bash benchmarks/gpu_check.sh     # CPU: every part on a tiny model, checks the script itself
#
# Python: $PYTHON, else the repository's .venv (built by `make` from the pinned versions), else python3. A machine
# without network cannot install the pinned torch (its CUDA wheel is far above what a device run may carry), so
# the torch part says which torch ran; other missing pure-Python wheels come from `bash benchmarks/gpu_wheels.sh`
# (fills the git-ignored .whl/, carried along and installed into /tmp/site before anything imports them).
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
LOG_DIR="${OUT:-runs/gpu_check}"
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/gpu_check.log"
GPU="${GPU_KIND:-h200}"
DRY=${DRY_RUN:+--dry-run}
export PYTHONUNBUFFERED=1

# part NAME CAP_SECONDS FIGURE_PATTERN COMMAND...: runs COMMAND under a cap, then one PASS/FAIL line for it with
# the last output line matching FIGURE_PATTERN (its figure).
part() {
    local name=$1 cap=$2 pattern=$3 out rc
    shift 3
    out=$(mktemp)
    timeout "$cap" "$@" 2>&1 | tee "$out"
    rc=${PIPESTATUS[0]}
    local figure
    figure=$(grep -E "$pattern" "$out" | tail -1)
    if (( rc == 0 )) && ! grep -q '^FAIL' "$out"; then
        echo "PASS $name: ${figure:-done}"
    else
        echo "FAIL $name (exit $rc$( ((rc == 124)) && echo ", over its ${cap} s cap")): ${figure:-see above}"
    fi
    rm -f "$out"
}

{
    echo "== $(date -u +%FT%TZ) $(hostname)"
    gpus=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
        gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            || echo "wheel install from .whl/ failed with $?"
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    pinned=$(grep -oE '"torch==[^"]+"' pyproject.toml | head -1 | tr -d '"' | cut -d= -f3)
    have=$("$PY" -c "import torch; print(torch.__version__.split('+')[0], torch.version.cuda)" 2>&1)
    if [[ ${have%% *} == "$pinned" ]]; then
        echo "PASS torch: $have ($PY), the pinned $pinned"
    else
        echo "FAIL torch: $have ($PY), pyproject.toml pins $pinned: the figures below are for this torch"
    fi
    # Caps add up to 630 s (540 on one GPU, below 10 minutes) with the planner's few seconds. The compiled run's cold
    # compile (about a minute) falls in its warm-up steps.
    part preflight 120 '^(PASS|FAIL)' "$PY" benchmarks/gpu_preflight.py $DRY
    part compiled 200 '^(1b|tiny) ' "$PY" benchmarks/gpu_check.py --out "$LOG_DIR" --compile --models 1b --policies loop \
        --depths 8 --warmup 2 --steps 10 $DRY
    part sweep 160 '^(small|1b|tiny) ' "$PY" benchmarks/gpu_check.py --out "$LOG_DIR" --warmup 2 --steps 10 $DRY "$@"
    if (( gpus >= 2 )) || [[ -n $DRY ]]; then
        nproc=$(( gpus >= 2 ? gpus : 2 ))
        part multi-GPU 90 '^(PASS|FAIL) ' "$PY" -m torch.distributed.run --standalone --nproc_per_node="$nproc" \
            benchmarks/gpu_multi.py $DRY
    else
        echo "skip multi-GPU: $gpus GPU(s) here (FSDP over 2+ GPUs and EP 2 need 2+)"
    fi
    for cfg in configs/small.toml configs/mythos_1b.toml; do
        part "plan $cfg on 1 x 1 $GPU" 30 'FIT' "$PY" -m mythos_train plan --config "$cfg" --nodes 1 --gpus-per-node 1 \
            --gpu "$GPU" --parallel.ep=1 --no-alternatives
    done
    bench_args=(--floor --require-reference --warmup 1 --steps 5)
    [[ -n $DRY ]] && bench_args+=(--batch 1 --seq 16 --loops 2 --peak-size 128)
    part bench 60 '^mythos_train(_floor)? vs open_mythos_full_depth' "$PY" -m mythos_train bench "${bench_args[@]}"
} 2>&1 | tee "$LOG"
echo "== summary"
grep -E '^(PASS|FAIL|skip) ' "$LOG"
echo "log: $LOG"
