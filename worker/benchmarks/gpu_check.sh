#!/usr/bin/env bash
# One-GPU check: CUDA-graph capture, losslessness (graph replay == eager == ar ==
# Hugging Face greedy) and timings at K = 2, 4, 8; one JSON file and a table.
# Needs only a preinstalled torch + transformers; runs from the source tree.
#   bash worker/benchmarks/gpu_check.sh                      # the GPU check (< 8 min on one H200)
#   bash worker/benchmarks/gpu_check.sh --device cpu --dry   # the CPU dry mode (the test suite runs it)
# Python: $PYTHON if set, else /opt/torch/.venv/bin/python if present, else python3.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x /opt/torch/.venv/bin/python ]]; then
  PY=/opt/torch/.venv/bin/python
else
  PY=python3
fi
# the script assembles the `dexserve` namespace from the tree itself; PYTHONPATH
# here only puts service/ first for anything it spawns
ROOT="$(cd "$HERE/../.." && pwd)"
export PYTHONPATH="$ROOT/service${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# $PY is word-split on purpose: PYTHON="python -X dev" works
# shellcheck disable=SC2086
exec $PY "$HERE/gpu_check.py" "$@"
