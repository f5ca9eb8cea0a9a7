#!/usr/bin/env bash
# The GPU check, at most 8 minutes on one CUDA GPU: the gpu-marked tests, one latency measurement per runtime that
# runs on CUDA here (eager with the GPU defaults and with CUDA graphs, torch.compile, ONNX Runtime's CUDA provider
# and TensorRT where installed), and a short search on the GPU. Prints key=value figures; the last line holds all.
#
#     bash bench/gpu_check.sh            # from the repository root, in an environment with the project installed
set -uo pipefail
cd "$(dirname "$0")/.."
export MIXERNAS_CACHE_DIR="${MIXERNAS_CACHE_DIR:-$(mktemp -d)}"
figures=()

gpu=$(python -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')")
if [ -z "$gpu" ]; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False)"; exit 2
fi
echo "gpu=${gpu// /_}"
figures+=("gpu=${gpu// /_}")

# 1. the tests that need a GPU
start=$SECONDS
timeout 150 python -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -3
figures+=("gpu_tests_rc=${PIPESTATUS[0]}" "gpu_tests_s=$((SECONDS - start))")

# 2. one model, 224x224, batch 1, on every runtime that runs on CUDA here (float16, channels-last, cuDNN benchmark)
measure() {  # name, extra flags...
    local name=$1; shift
    local out
    out=$(timeout 90 python -m searchspace.latency PoolFormerV2-S12 --device cuda --input-size 224 --no-table \
          --json "$@" 2>/dev/null | python -c "import json,sys; print(round(json.load(sys.stdin)['measured']['value_ms'], 4))")
    echo "  $name: ${out:-failed} ms"
    figures+=("ms_${name}=${out:-nan}")
}
measure eager --runtime eager
measure eager_graphs --runtime eager --cuda-graphs
measure eager_fp32 --runtime eager --dtype float32
measure compile --runtime compile
measure onnxruntime --runtime onnxruntime --dtype float32
measure tensorrt --runtime tensorrt

# 3. a short search on the GPU: candidates train and are measured there
start=$SECONDS
out=$(mktemp -d)
timeout 200 python search.py --latency-budget 2ms --device cuda --trials 6 --evaluator zero-cost --baselines none \
    --timeout 120 --out "$out/run" --quiet 2>&1 | tail -4
figures+=("search_rc=${PIPESTATUS[0]}" "search_s=$((SECONDS - start))")
if [ -f "$out/run/best.json" ]; then
    figures+=("search_best_ms=$(python -c "import json; print(round(json.load(open('$out/run/best.json'))['latency_ms'], 4))")")
fi

echo "${figures[*]}"
