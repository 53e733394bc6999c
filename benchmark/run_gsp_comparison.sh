#!/bin/bash
# Full cache vs Chelsea keep 0.2 under the shared-prefix serving load (issue: benchmarks).
# Usage: bash benchmark/run_gsp_comparison.sh [output-len] [threads]
# Starts one server per policy in turn, runs bench_serving.py against it, and prints
# both metric tables and the output-throughput ratio. Raw files: results/serving_gsp4k_*.
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT_LEN=${1:-128}
THREADS=${2:-2}
TAG=gsp4k_o${OUT_LEN}_t${THREADS}
BENCH="benchmark/bench_serving.py --dataset-name generated-shared-prefix --gsp-num-groups 4 \
  --gsp-prompts-per-group 16 --gsp-system-prompt-len 4096 --gsp-question-len 128 \
  --gsp-output-len $OUT_LEN --tokenize-prompt --flush-cache --output-details --seed 1"
wait_ready() { for _ in $(seq 1 300); do curl -sf "$1/health" >/dev/null 2>&1 && return 0; sleep 1; done; return 1; }
run_policy() {  # name port server-flags...
  local name=$1 port=$2; shift 2
  rm -f "results/serving_${TAG}_${name}.jsonl"
  setsid $PY -m sglang_chelsea.launch_server --port "$port" --num-threads "$THREADS" \
    --max-total-tokens 48000 --log-level warning "$@" > "results/serving_${TAG}_${name}.server.log" 2>&1 &
  local pid=$!
  if wait_ready "http://127.0.0.1:$port"; then
    echo "== $name (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
    $PY $BENCH --base-url "http://127.0.0.1:$port" \
      --output-file "results/serving_${TAG}_${name}.jsonl" | tee "results/serving_${TAG}_${name}.log"
  else
    echo "server for $name did not start; see results/serving_${TAG}_${name}.server.log"
  fi
  kill -- -"$pid" 2>/dev/null; sleep 3
}
mkdir -p results
run_policy none 31300 --kv-compression none
run_policy chelsea02 31310 --kv-compression chelsea --chelsea-keep-ratio 0.2
$PY - "$TAG" <<'PYEOF'
import json, sys
tag = sys.argv[1]
def tput(name):
    with open(f"results/serving_{tag}_{name}.jsonl") as f:
        return json.loads(f.readlines()[-1])["output_throughput"]
full, chelsea = tput("none"), tput("chelsea02")
print(f"output throughput: full {full:.2f} tok/s, chelsea keep 0.2 {chelsea:.2f} tok/s, "
      f"ratio {chelsea / full:.2f}x")
PYEOF
