#!/usr/bin/env bash
# Wheels the GPU image lacks, fetched here (it has no network) into the git-ignored .whl/ for gpu_check.sh.
# Pure-Python only, so one download serves its Python 3.12: torchdata (the data pipeline's loader) and open-mythos
# 0.5.0 (the bench's reference; loaded from its main.py, so none of its dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl torchdata==0.11.0 open-mythos==0.5.0
ls -l .whl
