#!/bin/bash
# Router with 2 workers vs 1 worker on a small generated-shared-prefix workload.
cd "$(dirname "$0")/.."
PY=.venv/bin/python
FLAGS="--kv-compression chelsea --chelsea-keep-ratio 0.2 --max-total-tokens 16000 --num-threads 1 --log-level warning"
BENCH="benchmark/bench_serving.py --dataset-name generated-shared-prefix --gsp-num-groups 4 --gsp-prompts-per-group 4 --gsp-system-prompt-len 1024 --gsp-question-len 64 --gsp-output-len 32 --tokenize-prompt --seed 1"
wait_ready() { for i in $(seq 1 240); do curl -sf $1/health >/dev/null 2>&1 && return 0; sleep 1; done; return 1; }
setsid $PY -m sglang_chelsea.launch_server --dp-size 2 --port 31000 $FLAGS > results/serving_router_dp2.server.log 2>&1 &
P=$!
wait_ready http://127.0.0.1:31000 && sleep 5 && $PY $BENCH --base-url http://127.0.0.1:31000 --output-file results/serving_router_dp2.jsonl > results/serving_router_dp2.log 2>&1
kill -- -$P 2>/dev/null; sleep 3
setsid $PY -m sglang_chelsea.launch_server --port 31010 $FLAGS > results/serving_router_dp1.server.log 2>&1 &
P=$!
wait_ready http://127.0.0.1:31010 && $PY $BENCH --base-url http://127.0.0.1:31010 --output-file results/serving_router_dp1.jsonl > results/serving_router_dp1.log 2>&1
kill -- -$P 2>/dev/null
echo done
