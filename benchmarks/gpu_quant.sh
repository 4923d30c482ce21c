#!/usr/bin/env bash
# On a GPU machine: install trtc (and ModelOpt from .whl when present), run the quantized-kernel
# GPU tests, the GEMM microbenchmark, then (with "engines") the 8B bf16 / FP8 / INT4-AWQ engines.
#   bash benchmarks/gpu_quant.sh [tests] [gemm] [engines] [quick]
set -uo pipefail
export PYTHONUNBUFFERED=1 TRTC_FIXTURES=${TRTC_FIXTURES:-$PWD/../fixtures}
OUT=${OUT:-/tmp/trtc-out}
mkdir -p "$OUT"
if ls ../../.whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site ../../.whl/*.whl 2>&1 | tail -1
  export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warning | tail -3
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
for part in "$@"; do case $part in
  tests) timeout 420 python3 -m pytest -q -m gpu -p no:cacheprovider tests/plugins tests/test_gpu_quantized.py tests/test_gpu_engine.py 2>&1 \
           | tee "$OUT/gpu_tests.log" | grep -v -E "^\s*$|warn" | tail -25 ;;
  kernels) timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/plugins/test_quant_gemm_kernels.py 2>&1 \
           | tee "$OUT/gpu_tests.log" | grep -v -E "^\s*$|warn" | tail -25 ;;
  gemm) timeout 150 python3 benchmarks/quant_gemm.py --m ${GEMM_M:-1,4,16,64} 2>&1 | tee "$OUT/quant_gemm.log" ;;
  engines) python3 benchmarks/gpu_engine.py --skip_compile --skip_long --engines bf16,fp8,int4_awq 2>&1 \
             | tee "$OUT/bench.log" | grep -v -E "Loading weights|Writing model|it/s\]" | tail -60 ;;
  quick) python3 benchmarks/gpu_engine.py --quick --skip_compile --skip_long --engines bf16,fp8,int4_awq 2>&1 \
             | tee "$OUT/bench_quick.log" | grep -v -E "Loading weights|Writing model|it/s\]" | tail -40 ;;
esac; done
