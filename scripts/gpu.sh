#!/usr/bin/env bash
# What a CUDA machine runs (CI has none): builds the extension against the torch installed there, then
#   bash scripts/gpu.sh test    the Triton kernels' tests on the GPU (compiled, not interpreted)
#   bash scripts/gpu.sh amx     the CPU conv2d/linear tests, where that machine's CPU has AMX (this one has not)
#   bash scripts/gpu.sh bench   benchmarks/test_triton_linear.py and test_triton_conv2d.py
#   bash scripts/gpu.sh sweep [gemv|skinny|conv]...   benchmarks/sweep_triton.py
# Logs and benchmark JSON go to $OUT (default gpu-results/).
set -u
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
py=python3
parallel=$($py -c "import xdist" 2>/dev/null && echo "-n 8")  # pytest-xdist where installed

{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
  lscpu | grep -E "Model name|^CPU\(s\)"
  echo "amx: $(grep -o -m1 -w amx_int8 /proc/cpuinfo || echo none)"
  $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$out/env.txt"

so=$($py -c "import sysconfig; print('quantkernels/_C' + sysconfig.get_config_var('EXT_SUFFIX'))")
if [ ! -f "$so" ]; then  # a carried build of the same sources skips the minute of compiling
  if ! MAX_JOBS=16 $py setup.py -q build_ext --inplace >"$out/build.log" 2>&1; then
    tail -40 "$out/build.log"
    exit 1
  fi
  cp "$so" "$out/"
fi

case "${1:-test}" in
  test)
    $py -m pytest -q $parallel -p no:cacheprovider python_tests/test_triton.py 2>&1 | tee "$out/test_triton.log" | tail -25
    ;;
  amx)
    if grep -q -w amx_int8 /proc/cpuinfo; then
      $py -m pytest -q $parallel -p no:cacheprovider python_tests/test_conv2d.py python_tests/test_linear.py 2>&1 |
        tee "$out/test_cpu_amx.log" | tail -15
    fi
    ;;
  sweep)
    shift
    $py -m benchmarks.sweep_triton "$@" 2>&1 | tee "$out/sweep.txt"
    ;;
  bench)
    for suite in linear conv2d; do
      $py -m pytest -q -p no:cacheprovider "benchmarks/test_triton_$suite.py" --benchmark-only \
        --benchmark-json="$out/triton_$suite.json" --benchmark-columns=median 2>&1 | tee "$out/bench_$suite.log" | tail -8
    done
    ;;
esac
