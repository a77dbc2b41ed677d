#!/usr/bin/env bash
# One device call for the CUDA backend: kernel property tests, GPU parity, benchmark; logs under $OUT.
#   bash tools/gpu_round.sh STEPS...   steps: kernels kernels2 cublas sampling parity ab prefill opdiff profile trace
#                                      context bench benchhf loadcheck moe plugins quant benchq
# paged: the batched (engine) kernels' property tests and batched-vs-solo generation (tests/test_cuda_paged.py);
# serve: `archkit bench --serve` (SERVE_CONFIGS: "--model NAME ...", SERVE_CONC: "--concurrency N ...").
# moe: the MoE kernels' property tests and MoE model parity (tests/test_cuda_moe.py); plugins: the plugin-op
# escape hatch on the GPU (tests/test_apertus.py, tests/test_custom_ops.py). BENCH_CONFIGS=qwen3-30b-a3b (any
# card) or mixtral-8x7b (H200 only: 93 GB of fp16 weights) bench the MoE shapes.
# Per-step time limits (seconds) come from KERNELS_S, PARITY_S, BENCH_S; BENCH_CONFIGS picks the shapes;
# KERNELS_K / KERNELS2_K / PARITY_K select tests (pytest -k) for kernels / kernels2 / parity.
# ab: decode only, one backend switch off vs on in one process (AB_SWITCH: fused (default), pdl or fold).
# trace: per-kernel GPU time of graph decode steps (CUPTI through torch.profiler). context: decode after a
# CONTEXT-token prompt (default 4096) vs after 8, TinyLlama shape. sampling: GPU sampling property tests.
# cublas: property tests of the cuBLAS linear path and the tensor-core prefill attention (tests/test_cuda_cublas.py).
# prefill: 2,048-token prefill only, our GEMM vs cuBLAS x SIMT vs tensor-core attention, and transformers.
# quant: the quantized-weight kernels' property tests and quantized checkpoints cuda vs cpu (tests/test_cuda_quant.py,
#        MoE experts kept quantized: tests/test_cuda_quant_moe.py);
# benchq: quantized decode / prefill against fp16 (`python -m core.cuda.bench CONFIG --quant w4a16|fp8|w8a16`).
# Expects PyCUDA installed and PYTHONPATH set (see ../shared/device/README.md).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
steps=${*:-kernels parity benchhf loadcheck}
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm,power.draw --format=csv | tee "$OUT/gpu.txt"
for step in $steps; do
  echo "=== $step ($(date +%T))"
  case $step in
    kernels) timeout "${KERNELS_S:-240}" python3 -m pytest -q -rfE --tb=short -p no:cacheprovider \
               ${KERNELS_K:+-k "$KERNELS_K"} tests/test_cuda_kernels.py tests/test_cuda_vocab_kernels.py 2>&1 | tee "$OUT/kernels.log" | tail -40 ;;
    kernels2) timeout "${KERNELS2_S:-240}" python3 -m pytest -q -rfE --tb=short -p no:cacheprovider \
               ${KERNELS2_K:+-k "$KERNELS2_K"} tests/test_cuda_kernels.py tests/test_cuda_vocab_kernels.py 2>&1 | tee "$OUT/kernels2.log" | tail -30 ;;
    cublas) timeout "${CUBLAS_S:-120}" python3 -m pytest -v -rfEs --tb=short -p no:cacheprovider \
               tests/test_cuda_cublas.py 2>&1 | tee "$OUT/cublas.log" | tail -25 ;;
    prefill) timeout "${BENCH_S:-120}" python3 -m core.cuda.bench ${BENCH_CONFIGS:-tinyllama-1.1b qwen3-8b} \
               --prefill-only --compare-hf --json "$OUT/prefill.json" 2>&1 | tee "$OUT/prefill.log" | tail -14 ;;
    parity) timeout "${PARITY_S:-240}" python3 -m pytest -q -rfE --tb=short -p no:cacheprovider \
               ${PARITY_K:+-k "$PARITY_K"} tests/test_cuda_parity.py 2>&1 | tee "$OUT/parity.log" | tail -40 ;;
    ab) timeout "${BENCH_S:-200}" python3 -m core.cuda.bench ${BENCH_CONFIGS:-} --ab ${AB_SWITCH:-fused} --json "$OUT/ab.json" \
               2>&1 | tee "$OUT/ab.log" | tail -12 ;;
    bench) timeout "${BENCH_S:-200}" python3 -m core.cuda.bench ${BENCH_CONFIGS:-} --json "$OUT/bench.json" \
               2>&1 | tee "$OUT/bench.log" | tail -30 ;;
    benchhf) timeout "${BENCH_S:-300}" python3 -m core.cuda.bench ${BENCH_CONFIGS:-} --compare-hf \
               --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -30 ;;
    loadcheck) timeout "${LOAD_S:-200}" python3 -c "import json, core.cuda.bench as b; \
               print(json.dumps(b.load_check('${LOAD_CONFIG:-qwen3-8b}', '${LOAD_DIR:-/tmp}'), indent=1))" \
               2>&1 | tee "$OUT/loadcheck.log" | tail -30 ;;
    quant) timeout "${QUANT_S:-300}" python3 -m pytest -q -rfEs --tb=short -p no:cacheprovider tests/test_cuda_quant.py tests/test_cuda_quant_moe.py 2>&1 \
               | tee "$OUT/quant.log" | tail -25 ;;
    benchq) for scheme in ${QUANT_SCHEMES:-w4a16 fp8 w8a16}; do
               timeout "${BENCH_S:-200}" python3 -m core.cuda.bench ${BENCH_CONFIGS:-qwen3-8b} --quant "$scheme" \
               --json "$OUT/benchq-$scheme.json" 2>&1 | tee "$OUT/benchq-$scheme.log" | tail -6; done ;;
    moe) timeout "${MOE_S:-200}" python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/test_cuda_moe.py 2>&1 \
               | tee "$OUT/moe.log" | tail -25 ;;
    paged) timeout "${PAGED_S:-150}" python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/test_cuda_paged.py tests/test_cuda_exit.py 2>&1 \
               | tee "$OUT/paged.log" | tail -25 ;;
    serve) timeout "${SERVE_S:-300}" python3 -m core bench --serve --device cuda ${SERVE_CONFIGS:---model tinyllama-1.1b} \
               ${SERVE_CONC:-} --compare-hf --json "$OUT/serve.json" 2>&1 | tee "$OUT/serve.log" | tail -20 ;;
    plugins) timeout 120 python3 -m pytest -q -rfEs --tb=short -p no:cacheprovider tests/test_apertus.py \
               tests/test_custom_ops.py 2>&1 | tee "$OUT/plugins.log" | tail -15 ;;
    sampling) timeout 120 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/test_cuda_sampling.py 2>&1 \
               | tee "$OUT/sampling.log" | tail -15 ;;
    trace) timeout 120 python3 -m core.cuda.bench ${BENCH_CONFIGS:-tinyllama-1.1b qwen3-0.6b gpt2-124m qwen3-8b} --trace \
               --json "$OUT/trace.json" --out /tmp 2>&1 | grep -v Warn | tee "$OUT/trace.log" | cut -c1-700 ;;
    context) timeout 120 python3 -m core.cuda.bench ${CONTEXT_CONFIGS:-tinyllama-1.1b} --context ${CONTEXT:-4096} \
               --json "$OUT/context.json" 2>&1 | tee "$OUT/context.log" | tail -3 ;;
    profile) timeout 120 python3 -m core.cuda.bench ${PROFILE_CONFIGS:-tinyllama qwen3-8b} --profile 2>&1 \
               | tee "$OUT/profile.log" | tail -60 ;;
    opdiff) timeout 120 python3 -c "import sys; sys.path.insert(0, 'tests'); import hfmodels as hf; \
               hf.save_model('${OPDIFF_FAMILY:-gemma2}', '/tmp/opdiff', seed=3, layers=3, hidden=128, heads=4, \
               intermediate=200, vocab=320, max_pos=512, kv_heads=2, ${OPDIFF_KW:-head_dim=32, sliding_window=24})" \
               && python3 -m core.cuda.opdiff /tmp/opdiff --dtype ${OPDIFF_DTYPE:-float32} 2>&1 | tee "$OUT/opdiff.log" ;;
    *) echo "unknown step $step" ;;
  esac
done
echo "=== done ($(date +%T))"
