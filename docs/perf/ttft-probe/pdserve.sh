#!/bin/bash
cd "$(dirname "$0")/../../.." && OUT=${OUT:-/tmp/ttft-probe} && mkdir -p "$OUT"
.venv/bin/pdserve up --model default --served-model-name default --prefill 1 --decode 1 --http-port 23000 --grpc-port 23001 \
  --control-port 23002 --worker-base-port 23100 --metrics-base-port 23200 --kv-base-port 23600 \
  --log-dir $OUT/logs > $OUT/up.log 2>&1 &
UP=$!
for i in $(seq 1 300); do curl -sf http://127.0.0.1:23000/ready >/dev/null && break; sleep 1; done
echo "ready after $i s"
.venv/bin/python docs/perf/ttft-probe/probe.py http://127.0.0.1:23000 | grep ttft
for p in 23200 23201; do curl -s http://127.0.0.1:$p/metrics | grep -E "^vllm:(request_queue_time_seconds_sum|request_prefill_time_seconds_sum|request_decode_time_seconds_sum|time_to_first_token_seconds_sum|request_inference_time_seconds_sum)"; done
kill -INT $UP; wait $UP
