#!/usr/bin/env bash
# Play the GPU machine's image on this CPU before a device is ever lent: a venv with the image's
# versions (triton 3.6.0, transformers 5.17.0, accelerate 1.15.0; torch 2.13 CPU, the nearest this
# machine has; numpy below 2.4, which triton 3.6's interpreter needs), without platformdirs,
# bitsandbytes, trl and diffusers (the image has none of them), then bench/gpu_run.sh in preflight mode on a
# copy of the tree as the device call gets it (tracked and untracked-not-ignored files plus the
# carried .gpu-wheels/, no .git), with PYTHONPATH=. and the kernels in Triton's interpreter.
# Every Python step of the GPU run executes; the CUDA-only parts (timing, nvidia-smi) are skipped.
# Then the whole test suite runs in that venv too. About 5 minutes once the venv exists.
# Run it before any submission that touches bench/, kernels/ or imports.
#   usage (repo root):  bash bench/gpu_preflight.sh [OUT_DIR]
# The venv is kept in $BOFT_TRITON_PREFLIGHT_VENV (default ~/.cache/boft_triton/preflight-venv)
# and rebuilt when this file's pins change.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
venv="${BOFT_TRITON_PREFLIGHT_VENV:-$HOME/.cache/boft_triton/preflight-venv}"
pins=(torch==2.13.0 triton==3.6.0 transformers==5.17.0 accelerate==1.15.0 "numpy<2.4" peft==0.21.0
      huggingface-hub==1.33.0 safetensors==0.8.0
      tqdm matplotlib pytest pytest-benchmark pytest-xdist requests pillow)
absent=(platformdirs bitsandbytes trl diffusers)
stamp="${pins[*]} | ${absent[*]}"

if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.pins" 2>/dev/null)" != "$stamp" ]; then
  echo "building the preflight venv in $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  PIP_DISABLE_PIP_VERSION_CHECK=1 "$venv/bin/pip" install -q "${pins[@]}" >"$venv.log" 2>&1 \
    || { tail -n 20 "$venv.log" >&2; exit 1; }
  "$venv/bin/pip" uninstall -q -y "${absent[@]}" 2>/dev/null || true
  echo "$stamp" >"$venv/.pins"
fi
for name in "${absent[@]}"; do
  if "$venv/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$name') is None)"; then
    echo "preflight venv has $name, which the GPU image lacks: remove $venv and rerun" >&2
    exit 2
  fi
done

[ -n "$(ls .gpu-wheels/*.whl 2>/dev/null)" ] || bash bench/gpu_wheels.sh

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir "$work/tree"
git ls-files -z -co --exclude-standard | xargs -0 cp --parents -t "$work/tree"
cp -r .gpu-wheels "$work/tree/"
out="${1:-$work/out}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

commit="$(git rev-parse --short HEAD)$( [ -z "$(git status --porcelain --untracked-files=no)" ] || echo '+dirty')"
cd "$work/tree"
set +e
env -u PYTHONPATH -u BOFT_TRITON_TUNE_CACHE PATH="$venv/bin:$PATH" PYTHON="$venv/bin/python" \
  BOFT_TRITON_PREFLIGHT=1 BOFT_TRITON_COMMIT="$commit" OUT="$out" bash bench/gpu_run.sh
run_rc=$?
# Then the whole test suite in the image's versions, from the same tree (what the image lacks is
# skipped): version breaks outside the GPU script's steps show here too.
echo "== the whole test suite in the image's versions"
env -u BOFT_TRITON_TUNE_CACHE PYTHONPATH="$work/tree" HF_HUB_OFFLINE=1 \
  "$venv/bin/python" -m pytest -q -p no:cacheprovider -n 2 -rfE >"$out/suite.log" 2>&1
suite_rc=$?
tail -n 3 "$out/suite.log"
[ "$run_rc" = 0 ] && [ "$suite_rc" = 0 ]
