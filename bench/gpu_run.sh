#!/usr/bin/env bash
# The one prepared device call (under 8 minutes): kernel microbenchmarks, kernel tests on CUDA, then
# the Llama-1B training-step benchmark (q/v, bf16, seq 2048, batch 4) for every method, LoRA r16
# included, and the same on a 4-bit NF4 base: QLoRA against QBOFT. Nothing is installed:
# it runs from the source tree on the device's own torch/triton. Results land in $OUT (or
# bench/results), named after the card and date; commit them under bench/results/.
#   usage (device machine, repo root):  bash bench/gpu_run.sh
set -uo pipefail
out="${OUT:-bench/results}"
mkdir -p "$out"
export PYTHONPATH=. HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu-info.csv"
timeout 220 python -m boft_triton.bench.gpu_check --out "$out" 2>&1 | tee "$out/gpu-check.log"
timeout 130 python -m boft_triton.bench.command --workload llama-1b --targets qv --steps 3 --warmup 1 \
  --output-dir "$out" 2>&1 | tee "$out/llama-1b.log"
# QBOFT against QLoRA on the same 4-bit NF4 base (needs bitsandbytes on the device; says so if absent).
timeout 110 python -m boft_triton.bench.command --workload llama-1b --targets qv --quantize nf4 --steps 3 --warmup 1 \
  --methods floor,peft-lora-r16,boft_triton-b4-N1,boft_triton-b8-N2 --output-dir "$out" 2>&1 | tee "$out/llama-1b-nf4.log"
