#!/usr/bin/env bash
# Reproduces every figure in the README's benchmark section, on the shipped model
# and its held-out prompts. Results land in worker/benchmarks/results/ as JSON.
# Run on a quiet machine (nothing else using the cores): ~45 minutes on 2 cores.
# Single steps: STEPS="2 3" bash worker/benchmarks/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
OUT=worker/benchmarks/results
mkdir -p "$OUT"
N=${PROMPTS:-50}
T=${NEW_TOKENS:-64}
STEPS=${STEPS:-1 2 3 4 5 6 7 8 9}
want() { [[ " $STEPS " == *" $1 "* ]]; }

# 1. DEX vs ar vs every select:J vs the EAD oracle, K = 4, 2, 8 (one process, 1 thread)
if want 1; then
for K in ${KS:-4 2 8}; do
  "$BIN/dex" bench --explorers "$K" --width 8 --limit "$N" --max-new-tokens "$T" --threads 1 --no-compile \
      --profile --out "$OUT/bench-k$K.json"
done
fi

# 2. the engine's own overhead with default flags: ar (K=1) against Hugging Face generate, 1 and 2
#    threads, beside the weight matmuls alone (the floor for any fp32 engine)
if want 2; then
for TH in 1 2; do
  "$BIN/dex" bench --explorers 1 --modes ar --hf --limit "$N" --max-new-tokens "$T" \
      --threads "$TH" --out "$OUT/ar-vs-hf-${TH}t.json"
done
fi

# 3. explorers on 2 devices (2 processes x 1 thread, shared-memory and gloo transports) vs ar,
#    select:1, HF generate and HF LayerSkip, 5 passes taken in turns; projection K=4, 8
if want 3; then
"$BIN/python" worker/benchmarks/speedup.py --repeats 5 --limit "$N" --max-new-tokens "$T" \
    --out "$OUT/speedup.json"
# the same with no flags at all: the auto layout, dex in turns with ar in one process (ar-1proc)
"$BIN/dex" bench --limit "$N" --max-new-tokens "$T" --out "$OUT/bench-default.json"
fi

# 4. the service: stand-in engine (isolates gateway + queue), then the real engine
if want 4; then
"$BIN/python" worker/benchmarks/service_bench.py --concurrency 1 10 100 --tokens 64 --json > "$OUT/service-standin.json"
"$BIN/python" worker/benchmarks/service_bench.py --engine dex --explorers 4 --width 8 --concurrency 1 4 \
    --tokens 64 --max-batch 4 --json > "$OUT/service-dex.json"
"$BIN/python" worker/benchmarks/service_bench.py --engine dex --explorers 4 --width 8 --door both \
    --concurrency 1 4 16 --tokens 64 --max-batch 16 --json > "$OUT/service-doors.json"
fi

# 5. tracing overhead on the shipped model; recovery after a killed worker (kill -9 -> next token)
if want 5; then
"$BIN/python" worker/benchmarks/tracing_overhead.py --repeats 5 --max-new-tokens 64 --json "$OUT/tracing-overhead.json"
"$BIN/python" worker/benchmarks/recovery.py --trials 5 \
    --config "before=--claim-idle-ms 10000 --claim-interval-ms 5000 --heartbeat-interval 2" --config after= \
    --out "$OUT/recovery.json"
fi

# 6. per-depth agreement of the shipped model's readouts with its final token
if want 6; then
"$BIN/python" worker/benchmarks/agreement.py --limit "$N" --max-new-tokens "$T" > "$OUT/agreement.txt"
fi

# 7. RPT against the width W: dex, dex-nodecs and the EAD oracle, K = 2, 4, 8, W = K .. 2^(K-1)
if want 7; then
"$BIN/python" worker/benchmarks/rpt_vs_width.py --limit "$N" --max-new-tokens "$T" \
    --out "$OUT/rpt-vs-width.json"
fi

# 8. explorer steps against 1/K of the full step (K = 1, 2, 4, 8; W = 1, 8; compiled, 1 thread)
if want 8; then
"$BIN/python" worker/benchmarks/step_scaling.py --out "$OUT/step-scaling.json"
fi

# 9. coordination per round with the null step (steps cost nothing; same lattice, packing, signalling)
if want 9; then
"$BIN/python" worker/benchmarks/round_overhead.py --rounds 2000 --repeats 3 --configs 2x1,4x8,8x16 \
    --out "$OUT/round-overhead.json"
fi

# 10. boundary adapters on a standard checkpoint (not in the default STEPS: ~50 minutes of training first).
#     The standard model (same architecture and corpus, no early-exit loss, 18 min at 1 thread), its
#     training split as JSONL, adapters for the K=8 grid (covers K=2 and 4) for 10 minutes each shape,
#     then agreement and dex RPT at K=2,4,8 with and without them, beside the shipped early-exit model.
if want 10; then
RUNS=${RUNS:-runs}
"$BIN/python" -m dexserve.training.train_early_exit --out "$RUNS/dexcode-6m-standard" --no-early-exit \
    --minutes 18 --steps 1400 --threads 1
"$BIN/python" worker/benchmarks/adapters.py corpus --out "$RUNS/bench/stdlib-train.jsonl"
"$BIN/dex" train-adapter --model "$RUNS/dexcode-6m-standard" --data "$RUNS/bench/stdlib-train.jsonl" --explorers 8 \
    --minutes 10 --lr 1e-2 --threads 2 --out "$RUNS/bench/full/dex_adapters.safetensors" --no-progress
"$BIN/dex" train-adapter --model "$RUNS/dexcode-6m-standard" --data "$RUNS/bench/stdlib-train.jsonl" --explorers 8 \
    --rank 32 --minutes 10 --lr 1e-2 --threads 2 --out "$RUNS/bench/rank32/dex_adapters.safetensors" --no-progress
# the model's own outputs as adapter data: up to 3 of the 10 minutes (--generate-share 0.3) of greedy continuations
# of training-split windows, the rest training on them
"$BIN/dex" train-adapter --model "$RUNS/dexcode-6m-standard" --data "$RUNS/bench/stdlib-train.jsonl" --explorers 8 \
    --self-generate 100000 --generate-share 0.3 --minutes 10 --lr 1e-2 --threads 2 \
    --out "$RUNS/bench/selfgen/dex_adapters.safetensors" --no-progress
"$BIN/python" worker/benchmarks/adapters.py run --standard "$RUNS/dexcode-6m-standard" \
    --adapters full="$RUNS/bench/full/dex_adapters.safetensors" \
    --adapters rank32="$RUNS/bench/rank32/dex_adapters.safetensors" \
    --adapters full-selfgen="$RUNS/bench/selfgen/dex_adapters.safetensors" \
    --limit 20 --max-new-tokens 64 --out "$OUT/adapters.json"
fi

# 11. boundary adapters on the shipped early-exit model, on its own outputs (not in the default STEPS: 12 minutes
#     of training first), then dex RPT at K=2, 4, 8 without and with them on the held-out prompts
if want 11; then
RUNS=${RUNS:-runs}
"$BIN/python" worker/benchmarks/adapters.py corpus --out "$RUNS/bench/stdlib-train.jsonl"
"$BIN/dex" train-adapter --model service/dexserve/models/dexcode-6m --data "$RUNS/bench/stdlib-train.jsonl" \
    --explorers 8 --self-generate 100000 --generate-share 0.3 --minutes 12 --lr 1e-2 --threads 2 \
    --out "$RUNS/bench/shipped-selfgen/dex_adapters.safetensors" --no-progress
for K in 2 4 8; do
    "$BIN/dex" bench --explorers $K --width 8 --limit 50 --max-new-tokens 64 --threads 1 --no-compile --modes dex \
        --adapters "$RUNS/bench/shipped-selfgen/dex_adapters.safetensors" --out "$OUT/bench-shipped-adapters-k$K.json"
done
fi
