#!/usr/bin/env bash
# The whole GPU run in one command, about 9 minutes on one H200 (stage limits add up to 540 s), every output
# written under $OUT as it is produced, so a kill loses only the stage it interrupted:
#   1. install the carried wheels offline (benchmarks/gpu/wheelhouse, built by wheelhouse.sh);
#   2. the check: the kernel tests in the background, meanwhile the bf16 logits and the bundled model's greedy
#      parity in the foreground (they also fill Triton's kernel cache for the benchmark);
#   3. the KV-sizing test alone (it reads the device's free memory);
#   4. the benchmark alone, at the batch sizes the targets need;
#   5. the served throughput over HTTP at batch 64 against the engine's.
#   OUT=/some/dir bash benchmarks/gpu/run_all.sh [--tiny]
# --tiny: the same stages on CPU (Triton interpreter, 2-layer models; the kernel tests only collected, the
# wheels only resolved): a dry run of this command. Exit status 0 when every stage passed.
set -uo pipefail
cd "$(dirname "$0")/../.."
TINY=()
if [[ "${1:-}" == "--tiny" ]]; then TINY=(--tiny); fi
OUT=${OUT:-/tmp/gpu-run}
PY=${PY:-python3}
WHEELS=benchmarks/gpu/wheelhouse
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
FAILED=()

log() { echo "[$(date -u +%T)] $*" | tee -a "$OUT/summary.txt"; }

stage() {  # NAME SECONDS COMMAND...: run under a time limit, output to the terminal and $OUT/NAME.log
  local name=$1 limit=$2 rc
  shift 2
  log "start $name (limit ${limit} s)"
  timeout -k 5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  log "end $name: exit $rc$( ((rc == 124)) && echo ' (time limit)')"
  ((rc == 0)) || FAILED+=("$name")
}

log "GPU run $(git rev-parse --short HEAD 2>/dev/null) ${TINY[*]}; output in $OUT"
{ nvidia-smi 2>&1 || echo "no nvidia-smi"; "$PY" -c "import sys, torch, triton, transformers
print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers',
      transformers.__version__, 'cuda', torch.cuda.is_available())"; } > "$OUT/machine.txt" 2>&1
tail -1 "$OUT/machine.txt" | tee -a "$OUT/summary.txt"

REQUIREMENTS=(-r benchmarks/gpu/carried.txt -r benchmarks/gpu/carried-no-deps.txt)
if ((${#TINY[@]})) && [[ -d $WHEELS ]]; then  # check the wheelhouse holds a cp312 wheel of each; install nothing
  stage install 30 "$PY" -m pip install --dry-run --no-deps --no-index --find-links "$WHEELS" --only-binary=:all: \
    --implementation cp --python-version 3.12 --abi cp312 --platform manylinux2014_x86_64 \
    --platform manylinux_2_28_x86_64 \
    --target "$OUT/wheel-check" "${REQUIREMENTS[@]}"
elif ((${#TINY[@]})); then  # no wheelhouse built here: the packages must be installed already
  stage install 30 "$PY" -c "import fastapi, uvicorn, pydantic, sse_starlette, openai, xgrammar"
else
  stage install 30 "$PY" -m pip install --no-index --find-links "$WHEELS" "${REQUIREMENTS[@]}"
fi

log "start kernel-tests in the background (limit 210 s, $OUT/kernel-tests.log)"
timeout -k 5 210 "$PY" -m benchmarks.gpu.check_gpu "${TINY[@]}" --only kernels > "$OUT/kernel-tests.log" 2>&1 &
KERNELS=$!
stage check 210 "$PY" -m benchmarks.gpu.check_gpu "${TINY[@]}" --only logits
wait "$KERNELS"
rc=$?
tail -15 "$OUT/kernel-tests.log"
log "end kernel-tests: exit $rc"
((rc == 0)) || FAILED+=(kernel-tests)

stage kv-sizing 40 "$PY" -m benchmarks.gpu.check_gpu "${TINY[@]}" --only kv

BENCH=(--batches 1,16,64,256 --hf-batches 1,16,64,256 --skip-torch-ref)
if ((${#TINY[@]})); then BENCH=(--batches 2 --hf-batches 2 --skip-torch-ref); fi
stage bench 180 "$PY" -m benchmarks.gpu.bench_gpu "${TINY[@]}" "${BENCH[@]}" --json "$OUT/bench_gpu.json"

stage serve 80 "$PY" -m benchmarks.gpu.serve_gpu "${TINY[@]}" --json "$OUT/serve_gpu.json"

if ((${#FAILED[@]})); then
  log "FAILED: ${FAILED[*]}"
  exit 1
fi
log "all stages passed"
