#!/bin/bash
cd "$(dirname "$0")/../../.." && OUT=${OUT:-/tmp/ttft-probe} && mkdir -p "$OUT"
M=$(.venv/bin/python -c "from pdserve.models import resolve_model; print(resolve_model('default'))")
VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python -m vllm.entrypoints.openai.api_server --model $M --served-model-name default --dtype float32 --max-model-len 2048 --enforce-eager --host 127.0.0.1 --port 23500 > $OUT/vllm.log 2>&1 &
P=$!
for i in $(seq 1 300); do curl -sf http://127.0.0.1:23500/v1/models >/dev/null && break; sleep 1; done
echo "ready after $i s"
.venv/bin/python docs/perf/ttft-probe/probe.py http://127.0.0.1:23500 2>&1 | grep probe- | grep ttft
curl -s http://127.0.0.1:23500/metrics | grep -E "^vllm:(request_queue_time_seconds_sum|request_queue_time_seconds_count|time_to_first_token_seconds_sum|time_to_first_token_seconds_count|request_prefill_time_seconds_sum)"
kill -INT $P; wait $P
