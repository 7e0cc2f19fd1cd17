#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels the GPU machine's image lacks (bench/gpu_wheels.txt)
# for its Python 3.12 on x86-64 Linux, into .gpu-wheels/ (git-ignored). The device call then
# carries that folder (`carry: [".gpu-wheels"]`) and bench/gpu_run.sh installs it offline.
#   usage (repo root):  bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.gpu-wheels
mkdir -p "$dest"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
grep -v '^\s*#' bench/gpu_wheels.txt | sed 's/#.*//' | xargs -r \
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest"
ls -l "$dest"
