"""Tile-configuration sweeps of the Triton kernels on a CUDA GPU, to choose configs.py's entries from
measurements: ``python -m benchmarks.sweep_triton [gemv|skinny|conv] ... > sweep.txt``.

Timing as in test_triton_linear.py (cuda_graphs.py: CUDA-graph replays over weight copies five times an H100's
L2); the median of 5 timings of 10 replays, in microseconds per call. Baselines (cuBLAS bf16,
tinygemm's ``_weight_int4pack_mm``, cuDNN bf16) are timed in the same process.
"""

from __future__ import annotations

import itertools
import math
import statistics
import sys

import torch
import torch.nn.functional as F

import quantkernels  # noqa: F401  (registers the CUDA kernels)
from quantkernels.formats import quantize_weight, unpack_int4
from quantkernels.triton import configs

from .cuda_graphs import capture, seconds_per_call, weight_copies

def time_us(make_call, bytes_per_copy):
    """Median microseconds per call of 5 timings of 10 graph replays (cuda_graphs)."""
    calls = weight_copies(bytes_per_copy, make_call)
    graph = capture(calls)
    return statistics.median(seconds_per_call(graph, len(calls), replays=10) for _ in range(5)) * 1e6


def baselines(m, n, k, group_size=128):
    """bf16 cuBLAS and tinygemm (torch's ``_weight_int4pack_mm``, int4 g``group_size``) at M x N x K, in us."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    result = {"bf16_cublas": time_us(lambda: (lambda wc=w.clone(): F.linear(x, wc)), n * k * 2)}
    qw = quantize_weight(torch.randn(n, k) / math.sqrt(k), bits=4, group_size=group_size)
    codes = unpack_int4(qw.qdata).to(torch.uint8)
    packed = (codes[:, 0::2] << 4 | codes[:, 1::2]).contiguous().cuda()
    sz = torch.stack([qw.scale.T, torch.zeros_like(qw.scale.T)], dim=-1).to(torch.bfloat16).contiguous().cuda()

    def tinygemm():
        p = torch._convert_weight_to_int4pack(packed, 8)
        return lambda: torch._weight_int4pack_mm(x, p, group_size, sz)

    result["int4pack_mm"] = time_us(tinygemm, qw.nbytes())
    return result


def linear_us(m, n, k, bits=4, group_size=128, act_int8=False):
    qw = quantize_weight(torch.randn(n, k) / math.sqrt(k), bits=bits, group_size=group_size)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    op = {(4, False): torch.ops.quant.linear_int4, (8, False): torch.ops.quant.linear_int8,
          (4, True): torch.ops.quant.linear_w4a8, (8, True): torch.ops.quant.linear_w8a8}[(bits, act_int8)]

    def make():
        q, s = qw.qdata.cuda(), qw.scale.cuda()
        return (lambda: op(x, q, s, None, None)) if bits == 4 else (lambda: op(x, q, s, None))
    return time_us(make, qw.nbytes())


def sweep_gemv():
    """linear_kernel's M = 1 family: tile shape, warps, stages, then the split-K target of the best two."""
    shapes = [(4096, 4096), (11008, 4096)]
    for n, k in shapes:
        print(f"baselines M=1 N={n} K={k}:", {key: round(v, 2) for key, v in baselines(1, n, k).items()}, flush=True)
    default, target = configs.LINEAR_CONFIGS, configs.SPLIT_K_TARGET_PROGRAMS
    results = []
    for block_n, warps, stages in itertools.product((16, 32, 64), (2, 4), (3, 5)):
        config = configs.TileConfig(1, block_n, 128, warps, stages, split_k=True)
        configs.LINEAR_CONFIGS = ((1, config),) + default[1:]
        times = [linear_us(1, n, k) for n, k in shapes]
        results.append((sum(times), config))
        print(f"gemv {config}: " + " / ".join(f"{t:.2f}" for t in times) + " us", flush=True)
    results.sort(key=lambda r: r[0])
    for _, config in results[:2]:
        configs.LINEAR_CONFIGS = ((1, config),) + default[1:]
        for programs in (256, 1024, 2048):
            configs.SPLIT_K_TARGET_PROGRAMS = programs
            times = [linear_us(1, n, k) for n, k in shapes]
            print(f"gemv {config} split-K target {programs}: " + " / ".join(f"{t:.2f}" for t in times) + " us",
                  flush=True)
    configs.LINEAR_CONFIGS, configs.SPLIT_K_TARGET_PROGRAMS = default, target


def sweep_skinny():
    shapes = [(4096, 4096), (11008, 4096)]
    for m in (2, 8, 16):
        for n, k in shapes:
            print(f"baselines M={m} N={n} K={k}:", {key: round(v, 2) for key, v in baselines(m, n, k).items()},
                  flush=True)
    default = configs.LINEAR_CONFIGS
    for block_n, warps, stages in itertools.product((32, 64, 128), (4, 8), (3, 5)):
        config = configs.TileConfig(16, block_n, 128, warps, stages, split_k=True)
        configs.LINEAR_CONFIGS = ((16, config),) + default[2:]
        times = [linear_us(m, n, k) for m in (2, 16) for n, k in shapes]
        print(f"skinny {config}: M=2 {times[0]:.2f}/{times[1]:.2f}, M=16 {times[2]:.2f}/{times[3]:.2f} us",
              flush=True)
    configs.LINEAR_CONFIGS = default


def sweep_conv():
    from benchmarks.shapes import CONV_SHAPES

    batch = 8
    for shape in [s for s in CONV_SHAPES if s.name.startswith("resnet50")]:
        row = []
        for channels_last in (False, True):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            x = torch.randn(batch, shape.in_channels, shape.size, shape.size, device="cuda",
                            dtype=torch.bfloat16).to(memory_format=fmt)
            w = torch.randn(shape.out_channels, shape.in_channels, shape.kernel, shape.kernel)
            qw = quantize_weight(w, bits=8)
            pad, kernel = shape.padding, [shape.kernel] * 2
            wb = w.to("cuda", torch.bfloat16).to(memory_format=fmt)
            torch.backends.cudnn.benchmark = True
            cudnn = time_us(lambda: (lambda wc=wb.clone(): F.conv2d(x, wc, None, shape.stride, pad)), wb.numel() * 2)
            ours = {}
            for act_int8 in (False, True):
                def make(act_int8=act_int8):
                    q, s = qw.qdata.cuda(), qw.scale.cuda()
                    return lambda: torch.ops.quant.conv2d_int8(x, q, s, None, kernel, [shape.stride] * 2, [pad] * 2,
                                                               [1, 1], 1, act_int8)
                ours["w8a8" if act_int8 else "w8"] = time_us(make, qw.nbytes())
            row.append(f"{'CL' if channels_last else 'NCHW'} cudnn {cudnn:.1f} w8 {ours['w8']:.1f} "
                       f"w8a8 {ours['w8a8']:.1f}")
        if shape.kernel == 1:
            m = batch * shape.size**2
            row.append(f"as GEMM M={m}: int8 {linear_us(m, shape.out_channels, shape.in_channels, bits=8):.1f} "
                       f"w8a8 {linear_us(m, shape.out_channels, shape.in_channels, bits=8, act_int8=True):.1f}")
        print(f"conv {shape.id()} b{batch}: " + " | ".join(row), flush=True)


if __name__ == "__main__":
    for part in sys.argv[1:] or ["gemv", "skinny", "conv"]:
        {"gemv": sweep_gemv, "skinny": sweep_skinny, "conv": sweep_conv}[part]()
