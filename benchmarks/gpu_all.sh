#!/usr/bin/env bash
# On a GPU machine: install trtc (no downloads needed), run the GPU tests, then the
# bf16 engine benchmark against HF transformers; with two GPUs or more, also the tensor-parallel
# tests and the tp 1 vs tp 2 benchmark. Fixtures are read from $TRTC_FIXTURES.
#   bash benchmarks/gpu_all.sh [quick]
set -uo pipefail
export PYTHONUNBUFFERED=1 TRTC_FIXTURES=${TRTC_FIXTURES:-$PWD/.carry/fixtures}
OUT=${OUT:-/tmp/trtc-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warning | tail -3
python3 -c "import torch, triton, trtc._core; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
if [ "${1:-}" = quick ]; then
  python3 benchmarks/gpu_engine.py --quick --skip_compile --skip_long 2>&1 | tee "$OUT/bench.log" | grep -v -E "Loading weights|Writing model" | tail -40
else
  python3 benchmarks/gpu_engine.py 2>&1 | tee "$OUT/bench.log" | grep -v -E "Loading weights|Writing model" | tail -60
fi
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -ge 2 ]; then
  python3 -m pytest -q -m multi_gpu tests -p no:cacheprovider -s 2>&1 | tee "$OUT/multi_gpu_tests.log" | tail -25
  python3 benchmarks/tp_gpu.py ${1:+--quick} --output_json "$OUT/tp_bench.json" 2>&1 | tee "$OUT/tp_bench.log" \
    | grep -v -E "Loading weights|Writing model" | tail -30
fi
