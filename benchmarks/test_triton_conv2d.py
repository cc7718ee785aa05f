"""int8 conv2d on a CUDA GPU: quant::conv2d_int8 (Triton implicit GEMM) beside cuDNN's bf16 and fp16
``F.conv2d``, NCHW and channels_last, on the ResNet-50 layers of issue 6 at batch 8 and 32.

Timed like test_triton_linear.py (cuda_graphs.py: CUDA-graph replays over weight copies five times an H100's
L2). ``extra_info`` records microseconds per call, TFLOP/s and the speedup over cuDNN bf16
in the same memory format. No target: issue 6 sets speed targets for the CPU kernels only.

    python -m pytest benchmarks/test_triton_conv2d.py --benchmark-only --benchmark-columns=median
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
import torch.nn.functional as F

from .cuda_graphs import benchmark_calls, capture, seconds_per_call, weight_copies
from .shapes import CONV_SHAPES

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: the Triton kernels run only on one"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="TRITON_INTERPRET=1: interpreted kernels have no meaningful speed"),
]

SHAPES = [shape for shape in CONV_SHAPES if shape.name.startswith("resnet50")]
BATCHES = [8, 32]
# quant_w8a8: int8 weights and dynamic int8 activations (one scale per image, int8 tensor cores);
# quant_w8_bf16: int8 weights, bf16 activations (bf16 tensor cores).
IMPLEMENTATIONS = ["quant_w8a8", "quant_w8_bf16", "bf16_cudnn", "fp16_cudnn"]


def _calls(impl, shape, batch, channels_last):
    """One zero-argument call per weight copy."""
    import quantkernels  # noqa: F401  (registers the CUDA kernels of the quant:: ops)
    from quantkernels.formats import quantize_weight

    w = torch.randn(shape.out_channels, shape.in_channels, shape.kernel, shape.kernel, device="cuda")
    w /= math.sqrt(w[0].numel())
    dtype = torch.float16 if impl == "fp16_cudnn" else torch.bfloat16
    x = torch.randn(batch, shape.in_channels, shape.size, shape.size, device="cuda", dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    if impl.endswith("cudnn"):
        layout = torch.channels_last if channels_last else torch.contiguous_format
        make = lambda: w.to(dtype).to(memory_format=layout)  # noqa: E731
        bytes_per_copy = w.numel() * 2
    else:
        qw = quantize_weight(w.cpu(), bits=8)
        make = lambda: (qw.qdata.cuda(), qw.scale.cuda())  # noqa: E731
        bytes_per_copy = qw.nbytes()
    copies = weight_copies(bytes_per_copy, make)
    pad = shape.padding
    if impl.endswith("cudnn"):
        return [lambda wc=wc: F.conv2d(x, wc, None, shape.stride, pad) for wc in copies]
    act_int8 = impl == "quant_w8a8"
    kernel, stride, padding = [shape.kernel] * 2, [shape.stride] * 2, [pad] * 2
    return [lambda q=q, s=s: torch.ops.quant.conv2d_int8(x, q, s, None, kernel, stride, padding, [1, 1], 1, act_int8)
            for q, s in copies]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.id())
def test_conv2d(benchmark, impl, channels_last, batch, shape):
    torch.backends.cudnn.benchmark = True
    benchmark.group = f"conv2d {shape.id()} batch {batch} {'channels_last' if channels_last else 'nchw'}"
    seconds = benchmark_calls(benchmark, _calls(impl, shape, batch, channels_last))
    benchmark.extra_info["tflops"] = shape.flops(batch) / seconds / 1e12
    if impl.startswith("quant"):
        bf16_calls = _calls("bf16_cudnn", shape, batch, channels_last)
        benchmark.extra_info["speedup_vs_bf16"] = seconds_per_call(capture(bf16_calls), len(bf16_calls)) / seconds
