#!/usr/bin/env bash
# GPU tests and benchmarks in one device call. Usage: benchmarks/gpu_suite.sh [STAGE...]
# Stages: tests decode decode-fp8 moe prefill sampler serve serve-fp8 (default: tests decode moe). Writes JSON and logs under $OUT.
# Wheels of missing dependencies travel in .whl (see docs/benchmarks.md, "CUDA").
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "epplat install failed"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
stages=${*:-tests decode moe}
for s in $stages; do
  echo "=== $s"; t0=$(date +%s)
  case $s in
    tests)  python3 -m pytest -q -rA -p no:cacheprovider tests/test_gpu.py -s 2>&1 | tee "$OUT/tests.log" | grep -E "^(PASSED|FAILED|ERROR)|fp8 logits|passed|failed"  ;;
    decode) python3 benchmarks/decode_roofline.py --batch 1 16 64 256 --profile 1 64 --compare-torch --out "$OUT/decode.json" 2>&1 \
              | tee "$OUT/decode.log" | tail -80 ;;
    decode-fp8) python3 benchmarks/decode_roofline.py --batch 1 16 64 256 --fp8 2>&1 \
              | tee "$OUT/decode_fp8.log" | tail -8 ;;
    moe)    python3 benchmarks/moe_layer_bench.py --out "$OUT/moe.json" 2>&1 | tee "$OUT/moe.log" | tail -40 ;;
    prefill) python3 benchmarks/prefill_bench.py --seqs 1 4 --len 2048 --profile --out "$OUT/prefill.json" 2>&1 \
              | tee "$OUT/prefill.log" | tail -30 ;;
    sampler) python3 benchmarks/sampler_bench.py --device cuda --out "$OUT/sampler.json" 2>&1 | tee "$OUT/sampler.log" | tail -16 ;;
    serve)  python3 benchmarks/serve_1gpu.py --out "$OUT/serve.json" 2>&1 | tee "$OUT/serve.log" | tail -40 ;;
    serve-fp8) python3 benchmarks/serve_1gpu.py --epplat-arg=--quantization --epplat-arg=fp8 --skip-transformers \
              --out "$OUT/serve_fp8.json" 2>&1 | tee "$OUT/serve_fp8.log" | tail -12 ;;
    *) echo "unknown stage $s" ;;
  esac
  echo "=== $s took $(( $(date +%s) - t0 )) s"
done
