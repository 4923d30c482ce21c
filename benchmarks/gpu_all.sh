#!/usr/bin/env bash
# On a GPU machine: install trtc (no downloads needed; ModelOpt from .whl/ when that folder is there),
# then run the named parts, by default the GPU tests, the bf16 engine benchmark against HF
# transformers and, with two GPUs or more, the tensor-parallel tests and the tp 1 vs tp 2 benchmark.
# Fixtures are read from $TRTC_FIXTURES.
#   bash benchmarks/gpu_all.sh [quick] [tests] [bench] [tp] [kernels] [gemm] [large_m] [variants] [engines] [moe]
#   kernels: the quantized-GEMM kernel tests; gemm: benchmarks/quant_gemm.py (rows $GEMM_M);
#   large_m: benchmarks/w4a16_large_m.py (W4A16 tactics, FP8 and the fused FP8 epilogues at M 1-4096 vs bf16);
#   variants: benchmarks/w4a16_variants.py (rows $GEMM_M, block shapes $W4A16_VARIANTS);
#   engines: the bf16, FP8 and INT4-AWQ 8B engines against HF transformers;
#   moe: the fused MoE kernel tests and benchmarks/moe.py (bf16, then FP8 experts);
#   archs: every architecture's engine against HF on the GPU, and the kernel tests of their features;
#   gemma: a Gemma-2-9B-shaped bf16 engine at batch 1 against HF;
#   moe_engines: Qwen3-30B-A3B- (12 of 48 layers) and Mixtral-8x7B-shaped (4 of 32 layers; bf16, FP8) engines
#     against HF (fewer layers to fit the disk: per-layer work is the model's);
#   pytest: the GPU tests named by $PYTEST_ARGS;
#   serve: `trtc serve` against the offline engine (8B, bf16) at concurrency $SERVE_CONCURRENCY, once per
#     --api_server_count in $SERVE_API_SERVERS (default 1,4), $SERVE_WAVES x concurrency requests (default 2)
#   maxtput: max-throughput mode (trtllm-bench's method) of 8B-shaped bf16 and FP8 (+FP8 KV) engines at
#     --max_batch_size ${MAXTPUT_BATCH:-2048}, ISL/OSL ${MAXTPUT_PAIRS:-128/128} (e.g. MAXTPUT_PAIRS=128/128,128/2048,
#     2048/128,1000/1000,500/2000), ${MAXTPUT_SECONDS:-60} s at most per pair, beside TensorRT-LLM's published figures
#   memory: the GPU memory-plan test (tests/test_gpu_memory_plan.py: peak <= plan, 2,000 requests at 256 in flight)
set -uo pipefail
export PYTHONUNBUFFERED=1 TRTC_FIXTURES=${TRTC_FIXTURES:-$PWD/.carry/fixtures}
OUT=${OUT:-/tmp/trtc-out}
mkdir -p "$OUT"
QUICK=
if [ "${1:-}" = quick ]; then QUICK=--quick; shift; fi
PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(tests bench tp)
WHL=${WHL:-$(ls -d .whl ../../.whl 2>/dev/null | head -1)}
if [ -n "$WHL" ] && ls "$WHL"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$WHL"/*.whl 2>&1 | tail -1
  export PYTHONPATH=/tmp/site
fi
python3 -c "import trtc._core" 2>/dev/null \
  || python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warning | tail -3
python3 -c "import torch, triton, trtc._core; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
SHOW='Loading weights|Writing model|it/s\]'
for part in "${PARTS[@]}"; do case $part in
  tests) python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 ;;
  kernels) python3 -m pytest -q -m gpu -p no:cacheprovider tests/plugins/test_quant_gemm_kernels.py \
             tests/plugins/test_w4a16_tc.py 2>&1 \
             | tee "$OUT/gpu_kernel_tests.log" | tail -25 ;;
  bench) if [ -n "$QUICK" ]; then ARGS=(--quick --skip_compile --skip_long); else ARGS=(); fi
         python3 benchmarks/gpu_engine.py "${ARGS[@]}" 2>&1 | tee "$OUT/bench.log" | grep -v -E "$SHOW" | tail -60 ;;
  engines) python3 benchmarks/gpu_engine.py $QUICK --skip_compile --skip_long --engines bf16,fp8,int4_awq 2>&1 \
             | tee "$OUT/bench_engines.log" | grep -v -E "$SHOW" | tail -60 ;;
  gemm) python3 benchmarks/quant_gemm.py --m "${GEMM_M:-1,4,16,64}" 2>&1 | tee "$OUT/quant_gemm.log" ;;
  large_m) python3 benchmarks/w4a16_large_m.py 2>&1 | tee "$OUT/w4a16_large_m.log" ;;
  variants) python3 benchmarks/w4a16_variants.py --m "${GEMM_M:-1,4,16,32,64}" --variants "${W4A16_VARIANTS:-8x8,8x4,4x8,4x16}" \
              2>&1 | tee "$OUT/w4a16_variants.log" ;;
  moe) python3 -m pytest -q -m gpu -p no:cacheprovider tests/plugins/test_moe_kernels.py 2>&1 \
         | tee "$OUT/moe_kernel_tests.log" | tail -25
       python3 benchmarks/moe.py 2>&1 | tee "$OUT/moe.log"
       python3 benchmarks/moe.py --fp8 2>&1 | tee "$OUT/moe_fp8.log" ;;
  pytest) python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short $PYTEST_ARGS 2>&1 | tee "$OUT/pytest.log" | tail -40 ;;
  archs) python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_archs.py tests/plugins/test_activation_kernels.py \
           tests/plugins/test_attention_kernels.py tests/plugins/test_norm_kernels.py tests/plugins/test_moe_kernels.py 2>&1 \
           | tee "$OUT/archs_tests.log" | tail -25 ;;
  gemma) python3 benchmarks/gpu_engine.py --model gemma2-9b --skip_long --skip_compile --skip_hf_static 2>&1 \
           | tee "$OUT/gemma.log" | grep -v -E "$SHOW" | tail -30
         rm -rf /tmp/trtc-gpu-bench-gemma2-9b-* ;;
  moe_engines) python3 benchmarks/gpu_engine.py --model qwen3-30b-a3b --num_layers 12 --skip_long --skip_compile 2>&1 \
                 | tee "$OUT/qwen3_moe.log" | grep -v -E "$SHOW" | tail -30
               rm -rf /tmp/trtc-gpu-bench-qwen3-30b-a3b-*
               python3 benchmarks/gpu_engine.py --model mixtral-8x7b --num_layers 4 --skip_long --skip_compile \
                 --engines bf16,fp8 2>&1 | tee "$OUT/mixtral.log" | grep -v -E "$SHOW" | tail -30
               rm -rf /tmp/trtc-gpu-bench-mixtral-8x7b-* ;;
  serve) S=/tmp/trtc-serve-8b
         python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import gpu_engine as g; g.make_checkpoint(g.Path('$S/hf'), g.LLAMA_8B)"
         python3 -m trtc.cli build --model_dir $S/hf --output_dir $S/engine ${BUILD_FLAGS:---max_seq_len 4096 --max_batch_size 512 --max_num_tokens 8192} \
           --overwrite 2>&1 | tail -2
         python3 benchmarks/serve_vs_offline.py $S/engine --concurrency "${SERVE_CONCURRENCY:-1,25,100,250,500}" \
           --api_server_count "${SERVE_API_SERVERS:-1,4}" --waves "${SERVE_WAVES:-2}" \
           --output_json "$OUT/serve_vs_offline.json" 2>&1 | tee "$OUT/serve.log" | grep -v -E "$SHOW" | tail -20
         rm -rf $S ;;
  maxtput) rm -rf /tmp/trtc-maxtput /tmp/trtc-gpu-bench-* /tmp/trtc-serve-8b
           python3 benchmarks/max_throughput.py --engines "${MAXTPUT_ENGINES:-bf16,fp8}" --pairs "${MAXTPUT_PAIRS:-128/128}" \
             --max_batch_size "${MAXTPUT_BATCH:-2048}" --max_seconds "${MAXTPUT_SECONDS:-60}" 2>&1 \
             | tee "$OUT/maxtput.log" | grep -v -E "$SHOW" | tail -40
           rm -rf /tmp/trtc-maxtput ;;
  memory) python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_memory_plan.py -s 2>&1 | tee "$OUT/memory_plan.log" \
            | tail -25 ;;
  tp) if [ "$GPUS" -ge 2 ]; then
        python3 -m pytest -q -m multi_gpu tests -p no:cacheprovider -s 2>&1 | tee "$OUT/multi_gpu_tests.log" | tail -25
        python3 benchmarks/tp_gpu.py $QUICK --output_json "$OUT/tp_bench.json" 2>&1 | tee "$OUT/tp_bench.log" \
          | grep -v -E "$SHOW" | tail -30
      fi ;;
  *) echo "unknown part $part"; exit 2 ;;
esac; done
