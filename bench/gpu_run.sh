#!/usr/bin/env bash
# The one prepared device call (under 9 minutes), on the GPU machine's image as it is (Python 3.12,
# torch 2.11, triton 3.6, no registry, no git): install the carried wheels, then
#   1. kernel microbenchmarks, each implementation checked against fp64 before it is timed;
#   2. the Llama-1B training step (q/v, bf16, seq 2048, batch 4) for every method, LoRA r16 included;
#   3. the same on a 4-bit NF4 base: QLoRA against QBOFT;
#   4. a diffusion UNet's denoising step (attention + ResNet convs): LoRA against BOFT;
#   5. serving: mixed-adapter batches over K = 1, 4, 16 adapters (forward, generate);
#   6. the kernel tests on CUDA;
# and print a short table last. Everything else goes under $OUT (default bench/results/gpu-run):
# logs, JSON, Markdown, plots, the tuning cache. Commit what it measured under bench/results/.
#
#   here, once (PyPI):       bash bench/gpu_wheels.sh            -> .gpu-wheels/ (git-ignored)
#   device call:             carry [".gpu-wheels"], command
#                            BOFT_TRITON_COMMIT=<sha> bash bench/gpu_run.sh
#   CPU preflight:           bash bench/gpu_preflight.sh  (runs this with BOFT_TRITON_PREFLIGHT=1:
#                            the same steps at tiny sizes, kernels in Triton's interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results/gpu-run}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
python="${PYTHON:-python3}"
preflight="${BOFT_TRITON_PREFLIGHT:-0}"

site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT
if compgen -G ".gpu-wheels/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    .gpu-wheels/*.whl 2>&1 | tee "$out/wheels.log"
else
  echo "no .gpu-wheels/: run bench/gpu_wheels.sh here and carry the folder (NF4 rows need bitsandbytes)" | tee "$out/wheels.log"
fi
export PYTHONPATH="$(pwd):$site" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1  # absolute: tests start processes elsewhere
export BOFT_TRITON_TUNE_CACHE="$out/tune.json"   # never a home directory's cache

if [ "$preflight" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  check=(--preflight)
  llama=(--workload tiny-llama --batch-size 1 --seq-len 16 --steps 1 --warmup 0 --device cpu)
  unet=(--workload unet --batch-size 1 --seq-len 256 --steps 1 --warmup 0 --device cpu)
  serve=(--workload serve --batch-size 4 --seq-len 8 --steps 1 --device cpu)
  engines=(--steps 1 --warmup 0)
  tests=(tests/test_kernels.py tests/test_wide_kernels.py tests/test_coarse_kernels.py tests/test_tune.py
         tests/test_mixed_batch.py)
  limit() { echo "$2"; }   # the interpreter's times are not the GPU's: generous limits
else
  check=()
  llama=(--workload llama-1b --steps 3 --warmup 1)
  unet=(--workload unet --batch-size 16 --seq-len 4096 --steps 3 --warmup 1)
  serve=(--workload serve --steps 5)
  engines=(--steps 5 --warmup 2)
  tests=(tests/test_kernels.py tests/test_wide_kernels.py tests/test_coarse_kernels.py tests/test_kernel_layers.py
         tests/test_torch_path.py tests/test_tune.py tests/test_mixed_batch.py)
  limit() { echo "$1"; }
fi

: >"$out/steps.tsv"
step() {  # step NAME GPU_SECONDS PREFLIGHT_SECONDS COMMAND...: run with a time limit, log, record status
  local name=$1 seconds
  seconds=$(limit "$2" "$3")
  shift 3
  local start=$SECONDS
  echo "== $name (limit ${seconds} s)"
  timeout "$seconds" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >>"$out/steps.tsv"
  tail -n 3 "$out/$name.log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 || true
  "$python" -c "import sys, torch, triton, numpy, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, 'transformers', transformers.__version__)"
} >"$out/environment.txt" 2>&1
cat "$out/environment.txt"

step gpu-check 75 600 "$python" -m boft_triton.bench.gpu_check --out "$out" "${check[@]}"
step llama-1b 125 600 "$python" -m boft_triton.bench.command "${llama[@]}" --targets qv --output-dir "$out"
step llama-1b-nf4 60 600 "$python" -m boft_triton.bench.command "${llama[@]}" --targets qv --quantize nf4 \
  --methods floor,peft-lora-r16,boft_triton-b4-N1,boft_triton-b8-N2 --output-dir "$out"
# pytest-xdist (on the image) spreads the tests, and so Triton's compiles, over up to 12 cores
parallel=()
cores=$(nproc)
"$python" -c "import xdist" 2>/dev/null && parallel=(-n "$((cores < 12 ? cores : 12))")
# diffusion: the SD-shaped UNet's denoising step (attention + ResNet convs), LoRA against BOFT
step unet 45 600 "$python" -m boft_triton.bench.command "${unet[@]}" --boft 8x1,8x2 --lora-ranks 16 \
  --methods floor,peft-lora-r16,peft-boft-b8-N2,boft_triton-b8-N1,boft_triton-b8-N2 --output-dir "$out"
# serving: mixed-adapter batches over K = 1, 4, 16 adapters (the segmented kernel) against a loop and LoRA
step serve 40 600 "$python" -m boft_triton.bench.command "${serve[@]}" --output-dir "$out"
# engines: FSDP2 with one process on the one GPU (the image has no deepspeed), boft_triton against LoRA
step engines 30 600 "$python" -m boft_triton.bench.engines --engines fsdp2 --nproc 1 "${engines[@]}" --output-dir "$out"
step kernel-tests 140 900 "$python" -m pytest -q -p no:cacheprovider "${parallel[@]}" "${tests[@]}" \
  -k "not compile_for_sm90" --junitxml="$out/gpu-tests.xml"

"$python" -m boft_triton.bench.gpu_summary "$out" >"$out/summary.txt"
rc=$?
cat "$out/summary.txt"
exit $rc
