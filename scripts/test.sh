#!/usr/bin/env bash
# The whole test suite: native core tests (plain and under ASan+UBSan), then the Python suite, which also
# runs every benchmark once with timing disabled so none of them rots.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
JOBS=$(nproc)

cmake -S . -B build/native -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build/native -j "$JOBS" >/dev/null
ctest --test-dir build/native --output-on-failure

cmake -S . -B build/sanitize -G Ninja -DCMAKE_BUILD_TYPE=Debug -DQK_SANITIZE=ON >/dev/null
cmake --build build/sanitize -j "$JOBS" >/dev/null
ctest --test-dir build/sanitize --output-on-failure

TRITON_INTERPRET=1 $PY -m pytest python_tests benchmarks --benchmark-disable -q -p no:cacheprovider "$@"
