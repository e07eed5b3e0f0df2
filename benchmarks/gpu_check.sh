#!/usr/bin/env bash
# GPU check: one script for a lent GPU machine (torch + triton installed, no network), about
# 7 minutes on one H100 / H200. It proves on hardware what CI proves under TRITON_INTERPRET=1:
#   1. build the extension; the CUDA tests: Triton LoRA shrink / expand, pool, paged attention
#      (bf16 / fp16 / fp32), the decode step captured as CUDA graphs (same tokens as eager,
#      replayed under torch's sync debug mode "error"), the measured launch tables;
#   2. the GPU benchmarks, each with the goals it checks (docs/benchmarks.md, "GPU check"):
#      lora_linear vs the base matmul (cuBLAS) at T = 16 / 256 / 4096: <= 1.15x / 1.10x;
#      fused pool vs unfused: >= 2x; paged attention vs one SDPA (flash) per sequence;
#      decode steps as CUDA graphs vs eager; Shared (mixed retrieval + generation steps) vs
#      Separate RAG: >= 1.2x; launch configs tuned for this GPU (kernels/tuned/).
#      (The peer bench, `bsharedrag bench --peers`, runs on CPU only so far: not part of this check.)
#   3. one summary, $OUT/gpu_check_<GPU>.json: the GPU, every goal met or not, each step's status.
# Usage: OUT=benchmarks/results/gpu_<name> bash benchmarks/gpu_check.sh   (default OUT: benchmarks/results)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
start=$SECONDS
pip install --no-build-isolation --no-deps -e . >"$out/gpu_build.log" 2>&1 || { tail -40 "$out/gpu_build.log"; exit 1; }
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))") || exit 1
echo "GPU: $gpu (build took $((SECONDS - start)) s)"
steps=()
run() {  # run NAME TIMEOUT CMD...: log to $out/NAME.log, record the exit status
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  tail -5 "$out/$name.log"
  echo "== $name: exit $rc in $((SECONDS - t0)) s"
  steps+=("$name=$rc")
}
run tests 170 python -m pytest -q -x tests/test_attention.py tests/test_graphs.py tests/test_lora_linear.py \
  tests/test_triton_kernels.py tests/test_pool.py tests/test_triton_pool.py tests/test_kernel_tuning.py
run lora_linear 70 python benchmarks/bench_lora_linear.py --device cuda --budget 0.05 --out "$out/lora_linear_cuda_$gpu.json"
run pool 35 python benchmarks/bench_pool.py --device cuda --budget 0.05 --out "$out/pool_cuda_$gpu.json"
run attention 40 python benchmarks/bench_attention.py --device cuda --budget 0.05 --out "$out/attention_cuda_$gpu.json"
run decode_graphs 60 python benchmarks/bench_decode_graphs.py --device cuda --rounds 3 --out "$out/decode_graphs_cuda_$gpu.json"
run engine 70 bsharedrag bench --device cuda --setups shared,separate --out "$out/bench_tiny_cuda_$gpu"
run tune 75 python benchmarks/tune_kernels.py --device cuda --budget 50 --out "$out/tuned/"
python benchmarks/gpu_summary.py --gpu "$gpu" --dir "$out" --seconds $((SECONDS - start)) "${steps[@]}"
