#!/usr/bin/env bash
# GPU tests and benchmarks in one device call. Usage: benchmarks/gpu_suite.sh [STAGE...]
# Stages: tests tests-decode sample-tests sample-kernel-tests fp8-expert-tests moe-fp8-decode decode-12l decode decode-fused
#         decode-kernels decode-bf16 decode-fp8 moe moe-fp8 prefill prefill-attention prefill-host prefill-fp8 sampler serve serve-fp8 serve-prefill
#         serve-decode serve-decode-async deepseek-decode deepseek-decode-fp8 serve-deepseek nixl-gpu pd-nixl
# (default: tests decode moe). Writes JSON and logs under $OUT.
# Wheels of missing dependencies travel in .whl (see docs/benchmarks.md, "CUDA"); nixl's, too big to
# travel with them, in a folder NIXL_WHEELS that an earlier call on the warm machine left there.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
for w in .whl ${NIXL_WHEELS:-}; do
  [ -d "$w" ] || continue
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$w"/*.whl \
    || exit 1
done
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "epplat install failed"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
model_12l() {   # the 12-layer Qwen3-MoE checkpoint of the serve stages, made once; prints its folder
  local m=/tmp/serve_model_12l
  [ -d $m ] || epplat make-model qwen3_moe $m --layers 12 --hidden 2048 --heads 32 --kv-heads 4 --head-dim 128 \
    --experts 128 --top-k 8 --moe-intermediate 768 --vocab-size 151936 --dtype bfloat16 --max-shard-size 4GB \
    --seed 0 >/dev/null
  echo $m
}
stages=${*:-tests decode moe}
for s in $stages; do
  echo "=== $s"; t0=$(date +%s)
  case $s in
    tests)  python3 -m pytest -q -rA -p no:cacheprovider --durations=12 tests/test_gpu.py -s 2>&1 | tee "$OUT/tests.log" | grep -E "^(PASSED|FAILED|ERROR)|fp8 logits|fp8 greedy|passed|failed"  ;;
    decode) python3 benchmarks/decode_roofline.py --batch 1 16 64 256 --profile 1 64 --compare-torch --out "$OUT/decode.json" 2>&1 \
              | tee "$OUT/decode.log" | tail -80 ;;
    decode-fused)   # the fused cuda decode layer against the modules' kernels, side by side (issue #19)
            python3 benchmarks/decode_roofline.py --batch 1 16 64 256 --profile 1 --compare-modules --compare-pdl \
              --out "$OUT/decode_fused.json" 2>&1 | tee "$OUT/decode_fused.log" | tail -70 ;;
    decode-kernels)   # the small-batch decode kernels one by one against what they replace (issue #19)
            python3 benchmarks/decode_kernels.py --out "$OUT/decode_kernels.json" 2>&1 \
              | tee "$OUT/decode_kernels.log" | tail -30 ;;
    tests-decode)   # the fused decode layer's GPU tests and the token tests it must keep
            python3 -m pytest -q -rA -p no:cacheprovider tests/test_gpu.py -k "fused_decode or cuda_graphs or \
fp32_greedy or decode_attention or experts_match or bf16_logits or fused_topk or kv_write or decode_kernels" 2>&1 \
              | tee "$OUT/tests_decode.log" | grep -E "^(PASSED|FAILED|ERROR)|passed|failed|Error" ;;
    decode-bf16) python3 benchmarks/decode_roofline.py --batch 1 16 64 256 --out "$OUT/decode_bf16.json" 2>&1 \
              | tee "$OUT/decode_bf16.log" | tail -8 ;;   # the decode-fp8 stage's bf16 side, no profile
    decode-fp8) python3 benchmarks/decode_roofline.py --batch 1 16 64 256 --fp8 2>&1 \
              | tee "$OUT/decode_fp8.log" | tail -8 ;;
    moe)    python3 benchmarks/moe_layer_bench.py --out "$OUT/moe.json" 2>&1 | tee "$OUT/moe.log" | tail -40 ;;
    moe-fp8)   # fp8 experts against the bf16 kernels the platform runs at each size, and the fp8 tile sweep only
            python3 benchmarks/moe_layer_bench.py --tiles --sorted-tiles --out "$OUT/moe_fp8.json" 2>&1 \
              | tee "$OUT/moe_fp8.log" | tail -24 ;;
    prefill) python3 benchmarks/prefill_bench.py --seqs 1 4 --len 2048 --profile --compare-modules --out "$OUT/prefill.json" 2>&1 \
              | tee "$OUT/prefill.log" | tail -30 ;;
    prefill-attention)   # one layer's prefill attention: the one-launch Triton kernel at several tiles against SDPA per chunk
            python3 benchmarks/prefill_attention_bench.py --out "$OUT/prefill_attention.json" 2>&1 \
              | tee "$OUT/prefill_attention.log" | tail -12 ;;
    prefill-host)   # where the host time of issuing one 1 x 2048 prefill step goes, by Python function
            python3 benchmarks/prefill_bench.py --seqs 1 --len 2048 --host-profile 2>&1 \
              | tee "$OUT/prefill_host.log" | grep -v "^\s*$" | cut -c1-150 | tail -75 ;;
    prefill-fp8) python3 benchmarks/prefill_bench.py --seqs 1 4 --len 2048 --fp8 --out "$OUT/prefill_fp8.json" 2>&1 \
              | tee "$OUT/prefill_fp8.log" | tail -8 ;;
    sample-tests) python3 -m pytest -q -rA -p no:cacheprovider tests/test_gpu.py -k "sample or graph" 2>&1 | tee "$OUT/sample_tests.log" | tail -15 ;;
    sample-kernel-tests) python3 -m pytest -q -rA -p no:cacheprovider tests/test_gpu.py -k sample 2>&1 | tee "$OUT/sample_kernel_tests.log" | tail -15 ;;
    fp8-expert-tests)   # the expert kernels' GPU tests (bf16, fp8, in graphs), the fused decode layer's (its script checks fp8 experts too)
            python3 -m pytest -q -rA -p no:cacheprovider tests/test_gpu.py -k "experts_match or fp8_logits or fused_decode or fp8_cuda_graphs" \
              -s 2>&1 | tee "$OUT/fp8_expert_tests.log" | grep -E "^(PASSED|FAILED|ERROR)|fp8 logits|passed|failed|Error" ;;
    moe-fp8-decode)   # fp8 experts against bf16 at decode sizes only, with a sweep of fp8 tiles (issue #19)
            python3 benchmarks/moe_layer_bench.py --tokens 1 16 64 256 --tiles --sorted-tiles --fp8-tiles \
              16-64-128-64-128-4-4 16-32-128-32-128-4-4 16-64-128-64-128-4-8 16-32-128-64-128-4-4 16-128-128-128-128-2-4 \
              --out "$OUT/moe_fp8_decode.json" 2>&1 | tee "$OUT/moe_fp8_decode.log" | tail -24 ;;
    decode-12l)   # the decode step of 12 Qwen3-30B-A3B layers, bf16 then fp8 experts, one after the other
            for q in "" --fp8; do python3 benchmarks/decode_roofline.py --layers 12 --batch 1 16 64 256 $q \
              --out "$OUT/decode_12l${q:+_fp8}.json" 2>&1 | tee "$OUT/decode_12l${q:+_fp8}.log" | tail -8; done ;;
    sampler) python3 benchmarks/sampler_bench.py --device cuda --sweep --out "$OUT/sampler.json" 2>&1 | tee "$OUT/sampler.log" | tail -40 ;;
    serve-prefill|serve-decode|serve-decode-async)   # the 12-layer checkpoint, made once; SERVE_ARGS adds epplat serve flags
            m=$(model_12l)
            if [ $s = serve-prefill ]; then load="--input-len 2048 --output-len 4 --concurrency 16 --num-prompts 256"
            else load="--input-len 128 --output-len 256 --concurrency 128 --num-prompts 256"; fi
            extra=; [ $s = serve-decode-async ] && extra=--epplat-arg=--async-scheduling
            python3 benchmarks/serve_1gpu.py --model-dir $m $load --skip-transformers $extra ${SERVE_ARGS:-} \
              --out "$OUT/$s${SERVE_TAG:-}.json" 2>&1 | tee "$OUT/$s${SERVE_TAG:-}.log" | tail -5
            if [ $s = serve-decode-async ]; then   # TPOT beside the in-process decode step at that batch and context
              python3 benchmarks/decode_roofline.py --layers 12 --batch 128 --context 256 --out "$OUT/decode_12l_b128.json" \
                2>&1 | tee "$OUT/decode_12l_b128.log" | tail -3
              python3 benchmarks/host_overhead.py --platform cuda --model-dir $m --dtype bfloat16 --batch 128 --prompt 128 \
                --steps 64 --kv-gib 16 --out "$OUT/host_overhead_cuda.json" 2>&1 | tee "$OUT/host_overhead_cuda.log" | tail -4
              python3 -c 'import json, sys; o = sys.argv[1]
t = json.load(open(f"{o}/serve-decode-async.json"))["results"]["epplat"]["median_tpot_ms"]
d = json.load(open(f"{o}/decode_12l_b128.json"))["rows"][0]["graph_ms"]
print(f"serve-decode-async: TPOT p50 {t:.2f} ms, in-process decode step (batch 128, context 256, graphs) {d:.2f} ms: "
      f"{(t / d - 1) * 100:+.0f}% (target: within 15%)")' "$OUT"
            fi ;;
    deepseek-decode) python3 benchmarks/deepseek_decode_roofline.py --batch 1 64 256 --profile 64 \
              --out "$OUT/deepseek_decode.json" 2>&1 | tee "$OUT/deepseek_decode.log" | tail -40 ;;
    deepseek-decode-fp8)   # the same step as deepseek-decode with every linear and expert in fp8 (run both to compare)
            python3 benchmarks/deepseek_decode_roofline.py --batch 1 64 256 --fp8 --profile 64 \
              --out "$OUT/deepseek_decode_fp8.json" 2>&1 | tee "$OUT/deepseek_decode_fp8.log" | tail -40 ;;
    serve-deepseek)   # DeepSeek-V2-Lite's shapes with DS_LAYERS layers (first dense), decode-heavy load
            m=/tmp/serve_ds; [ -d $m ] || epplat make-model deepseek_v2 $m --layers ${DS_LAYERS:-4} --hidden 2048 \
              --heads 16 --head-dim 128 --q-lora-rank 0 --kv-lora-rank 512 --rope-head-dim 64 --experts 64 --top-k 6 \
              --shared-experts 2 --first-dense 1 --moe-intermediate 1408 --intermediate 10944 --vocab-size 102400 \
              --dtype bfloat16 --max-shard-size 4GB --seed 0 >/dev/null
            python3 benchmarks/serve_1gpu.py --model-dir $m --input-len 128 --output-len 256 --concurrency 64 \
              --num-prompts 128 --skip-transformers --out "$OUT/serve_deepseek.json" 2>&1 \
              | tee "$OUT/serve_deepseek.log" | tail -8 ;;
    serve)  python3 benchmarks/serve_1gpu.py --out "$OUT/serve.json" 2>&1 | tee "$OUT/serve.log" | tail -40 ;;
    serve-fp8) python3 benchmarks/serve_1gpu.py --epplat-arg=--quantization --epplat-arg=fp8 --skip-transformers \
              --out "$OUT/serve_fp8.json" 2>&1 | tee "$OUT/serve_fp8.log" | tail -12 ;;
    nixl-gpu)  # NIXL READ between two processes of the one GPU against copy_, UCX's defaults against
               # cuda_ipc's zero-copy GET forced on (UCX turns it off where it finds no NVLink)
            python3 -c 'import nixl' || { echo "nixl-gpu: nixl missing (NIXL_WHEELS, see docs/benchmarks.md)"; continue; }
            UCX_PROTO_INFO=y python3 benchmarks/nixl_bandwidth_gpu.py --mib 256 --block-kib 256 \
              --ucx "" "UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y" \
              "UCX_TLS=cuda_ipc,cuda_copy,tcp,self UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y" > "$OUT/nixl_gpu.log" 2>&1
            grep -E "GB/s|Traceback|Error" "$OUT/nixl_gpu.log"
            grep -B2 -A8 "remote memory read" "$OUT/nixl_gpu.log" | head -60 ;;
    pd-nixl)   # a prefill and a decode server sharing the one GPU, NixlConnector on GPU memory, epplat proxy in
               # (extra UCX settings in PD_UCX; NixlConnector itself turns cuda_ipc's READ on)
               # front, against one colocated server, the same load (bench_serve), one after the other
            python3 -c 'import nixl' || { echo "pd-nixl: nixl missing (NIXL_WHEELS, see docs/benchmarks.md)"; continue; }
            env ${PD_UCX:-} UCX_PROTO_INFO=y python3 benchmarks/pd_vs_colocated.py --model-dir $(model_12l) --kv-buffer-device cuda \
              --input-len 2048 --output-len 128 --concurrency 16 --num-prompts 64 \
              --epplat-arg=--kv-cache-memory-bytes --epplat-arg=${PD_KV_BYTES:-20000000000} \
              --logdir "$OUT/pd-nixl-logs" --out "$OUT/pd_nixl.json" 2>&1 | tee "$OUT/pd_nixl.log" | tail -6
            # decode requests whose KV did not come through NIXL (recomputed there): must be 0
            echo "pd-nixl: prompts recomputed on the decode side: $(grep -c 'computing its prompt here' "$OUT"/pd-nixl-logs/decode.log)"
            # which UCX transport moved the KV (cuda_ipc between the two processes of one GPU, if UCX found it)
            grep -h -A6 "remote memory read by ucp_get" "$OUT"/pd-nixl-logs/decode.log | grep -m4 -E "cuda|copy" ;;
    *) echo "unknown stage $s" ;;
  esac
  echo "=== $s took $(( $(date +%s) - t0 )) s"
done
