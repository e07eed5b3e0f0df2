#!/usr/bin/env bash
# GPU check, one script for a lent GPU machine (torch + triton preinstalled, no network):
# build the extension, run the tests with the Triton kernels on CUDA (bf16 included), then
# the kernel benchmarks (lora_linear, pool) and `bsharedrag bench` on the GPU. Writes logs + JSON to $OUT (or benchmarks/results/).
# Takes well under 5 minutes on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
pip install --no-build-isolation --no-deps -e . >"$out/gpu_build.log" 2>&1 || { tail -40 "$out/gpu_build.log"; exit 1; }
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
echo "GPU: $gpu"
status=0
timeout 150 python -m pytest -q -x tests/test_lora_linear.py tests/test_triton_kernels.py tests/test_pool.py tests/test_triton_pool.py 2>&1 | tee "$out/gpu_tests_$gpu.txt" || status=1
timeout 120 python benchmarks/bench_lora_linear.py --device cuda --budget 0.1 --out "$out/lora_linear_cuda_$gpu.json" || status=1
timeout 60 python benchmarks/bench_pool.py --device cuda --budget 0.1 --out "$out/pool_cuda_$gpu.json" || status=1
# Shared vs Separate RAG on the GPU (the mixed-workload goals); add hf_peft where transformers + peft are installed
timeout 120 bsharedrag bench --device cuda --setups shared,separate --out "$out/bench_tiny_cuda_$gpu" || status=1
exit $status
