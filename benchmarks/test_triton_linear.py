"""int4 weight-only linear on a CUDA GPU: quant::linear_int4 (Triton) beside bf16 and fp16 F.linear (cuBLAS)
and torch's own int4 kernel (``_weight_int4pack_mm``, tinygemm), at decode sizes M = 1..16.

Timed with cuda_graphs.py: one call per weight copy captured in a CUDA graph and replayed (no Python launch
overhead: the kernels are what is compared), the copies together five times an H100's L2 so that every call
streams its weight from HBM, as in a real model. ``extra_info`` records microseconds per call, weight GB/s and
the speedup over bf16 cuBLAS.

Targets: int4 at M = 1..16 at least 3x faster than bf16 cuBLAS, and never slower at M = 1 (asserted below).

    python -m pytest benchmarks/test_triton_linear.py --benchmark-columns=median,ops
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
import torch.nn.functional as F

from .cuda_graphs import benchmark_calls, capture, seconds_per_call, weight_copies

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: the Triton kernels run only on one"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="TRITON_INTERPRET=1: interpreted kernels have no meaningful speed"),
]

SHAPES = [(4096, 4096), (11008, 4096)]  # (N, K): Llama-7B attention and MLP projections
MS = [1, 2, 4, 8, 16]
GROUP_SIZE = 128
IMPLEMENTATIONS = ["quant_int4", "bf16_cublas", "fp16_cublas", "int4pack_mm"]
TARGET_SPEEDUP = 3.0


def _calls(impl, m, n, k):
    """(one zero-argument call per weight copy, weight bytes each call reads)."""
    import quantkernels  # noqa: F401  (registers the CUDA kernels of the quant:: ops)
    from quantkernels.formats import quantize_weight, unpack_int4

    w = torch.randn(n, k, device="cuda") / math.sqrt(k)
    if impl in ("bf16_cublas", "fp16_cublas"):
        dtype = torch.bfloat16 if impl == "bf16_cublas" else torch.float16
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        weights = weight_copies(n * k * 2, lambda: w.to(dtype))
        return [lambda wc=wc: F.linear(x, wc) for wc in weights], n * k * 2

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    qw = quantize_weight(w, bits=4, group_size=GROUP_SIZE, symmetric=True)
    if impl == "quant_int4":
        weights = weight_copies(qw.nbytes(), lambda: (qw.qdata.clone(), qw.scale.clone()))
        return [lambda q=q, s=s: torch.ops.quant.linear_int4(x, q, s, None, None) for q, s in weights], qw.nbytes()

    # tinygemm wants element 2j in the high nibble and (code - 8) * scale + zero with a float zero (0 here).
    codes = unpack_int4(qw.qdata).to(torch.uint8)
    tinygemm_bytes = (codes[:, 0::2] << 4 | codes[:, 1::2]).contiguous()
    scales_and_zeros = torch.stack([qw.scale.T, torch.zeros_like(qw.scale.T)], dim=-1).to(torch.bfloat16).contiguous()

    def pack():
        return torch._convert_weight_to_int4pack(tinygemm_bytes, 8), scales_and_zeros.clone()

    weights = weight_copies(qw.nbytes(), pack)
    return [lambda p=p, sz=sz: torch._weight_int4pack_mm(x, p, GROUP_SIZE, sz) for p, sz in weights], qw.nbytes()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,k", SHAPES, ids=lambda v: str(v))
def test_int4_linear(benchmark, impl, m, n, k):
    calls, weight_bytes = _calls(impl, m, n, k)
    benchmark.group = f"linear M={m} N={n} K={k}"
    seconds = benchmark_calls(benchmark, calls)
    benchmark.extra_info["weight_gb_per_s"] = weight_bytes / seconds / 1e9
    if impl == "quant_int4":
        bf16_calls, _ = _calls("bf16_cublas", m, n, k)
        speedup = seconds_per_call(capture(bf16_calls), len(bf16_calls)) / seconds
        benchmark.extra_info.update(speedup_vs_bf16=speedup, meets_3x_target=speedup >= TARGET_SPEEDUP)


@pytest.mark.parametrize("n,k", SHAPES, ids=lambda v: str(v))
def test_int4_never_slower_than_bf16_at_m1(n, k):
    best = {}
    for impl in ("bf16_cublas", "quant_int4"):
        calls, _ = _calls(impl, 1, n, k)
        graph = capture(calls)
        best[impl] = min(seconds_per_call(graph, len(calls)) for _ in range(3))
    bf16, int4 = best["bf16_cublas"], best["quant_int4"]
    assert int4 <= bf16, f"int4 {int4 * 1e6:.1f} us per call, bf16 cuBLAS {bf16 * 1e6:.1f} us"
