#!/usr/bin/env bash
# Serving benchmark: our server and `transformers serve` on the bundled checkpoint, driven by the same
# `python -m server.bench` workload, one after the other on this machine. Writes JSON results and a plot to
# benchmarks/results/. Needs `pip install accelerate "transformers[serving]"` for the baseline.
#   bash benchmarks/serve_compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=benchmarks/results
MODEL=model/assets/tiny-jetmoe
mkdir -p "$OUT"
WORKLOAD=(--endpoint chat --num-prompts 48 --random-input-len 48 --random-output-len 96 --random-range-ratio 0.5
          --seed 0 --max-concurrency 16 --disable-tqdm)  # no ignore_eos: transformers serve refuses it

wait_up() {  # URL
  for _ in $(seq 120); do curl -sf "$1/v1/models" >/dev/null && return 0; sleep 1; done
  echo "server at $1 did not start" >&2; return 1
}

"$PY" -m server --model "$MODEL" --port 8101 --log-level warning & OURS=$!
trap 'kill $OURS ${THEIRS:-} 2>/dev/null || true' EXIT
wait_up http://127.0.0.1:8101
"$PY" -m server.bench --base-url http://127.0.0.1:8101 "${WORKLOAD[@]}" --request-rate inf --save-result "$OUT/ours.json"
"$PY" -m server.bench --base-url http://127.0.0.1:8101 "${WORKLOAD[@]}" --request-rate 2,4,8,inf \
  --save-result "$OUT/ours_rates.json" --plot "$OUT/ours_rates.png"
kill $OURS; wait $OURS 2>/dev/null || true

"$(dirname "$PY")/transformers" serve "$MODEL" --device cpu --dtype float32 --port 8102 --continuous-batching \
  --cb-block-size 64 --cb-num-blocks 512 --cb-max-batch-tokens 2048 --log-level warning & THEIRS=$!
wait_up http://127.0.0.1:8102
"$PY" -m server.bench --base-url http://127.0.0.1:8102 "${WORKLOAD[@]}" --model "$MODEL" --request-rate inf \
  --save-result "$OUT/transformers_serve.json"
