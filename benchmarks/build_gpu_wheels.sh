#!/usr/bin/env bash
# Build/download, on a machine with network, the wheels benchmarks/gpu_check.sh installs on a GPU
# machine that has none. Run from anywhere: bash benchmarks/build_gpu_wheels.sh
#
# The GPU image already holds torch, transformers, accelerate, tensorboard, tokenizers, numpy,
# pandas, pyarrow, fsspec, xxhash, huggingface-hub, pyyaml, psutil, py-cpuinfo, einops, msgpack,
# ninja, absl-py, six, click, joblib, regex, tqdm and pytest (the device docs' package list), so only
# what it lacks is shipped: pyarrow alone would be ~45 MiB. Versions are the ones .venv runs the
# tests with. Binary wheels are fetched for CPython 3.11 and 3.12 (the image's python is 3.12);
# pip picks the matching one at install time.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
WHEELS="$ROOT/benchmarks/wheels"
PIP=("$VENV/bin/python" -m pip)

version() { "${PIP[@]}" show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }

# Missing from the GPU image: deepspeed and its pydantic/hjson; datasets' dill/multiprocess;
# rouge-score's nltk/defusedxml. pytest and its plugins are insurance (installed only if absent).
BUILD=(deepspeed rouge-score)  # sdists only on PyPI
DOWNLOAD=(hjson pydantic pydantic-core annotated-types typing-inspection datasets dill multiprocess nltk defusedxml
          pytest pluggy iniconfig pytest-timeout)

rm -rf "$WHEELS"
mkdir -p "$WHEELS"
pins=()
for name in "${BUILD[@]}" "${DOWNLOAD[@]}"; do
  v="$(version "$name")"
  [[ -n "$v" ]] || { echo "build_gpu_wheels: $name is not installed in $VENV (run make install)" >&2; exit 1; }
  pins+=("$name==$v")
done

# deepspeed: no ops prebuilt (DS_BUILD_OPS=0); the GPU run uses torch's AdamW, so nothing is JIT-built.
# --no-build-isolation: its setup.py imports torch, which only the venv has.
DS_BUILD_OPS=0 "${PIP[@]}" wheel -q --no-deps --no-build-isolation -w "$WHEELS" "${pins[0]}" "${pins[1]}"

platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
for py in 3.11 3.12; do
  "${PIP[@]}" download -q --no-deps --only-binary=:all: --implementation cp --python-version "$py" \
    "${platforms[@]}" -d "$WHEELS" "${pins[@]:2}"
done

ls -l "$WHEELS"
du -sh "$WHEELS"
