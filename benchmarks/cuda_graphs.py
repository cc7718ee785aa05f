"""Timing GPU calls the way every GPU benchmark here does (test_triton_linear.py, test_triton_conv2d.py,
sweep_triton.py): one call per weight copy, the copies together ``STREAMED_BYTES`` (five times an H100's 50 MB
L2, so that each call reads its weight from HBM as a layer of a real model does), captured once in a CUDA graph
and replayed, which removes Python's launch overhead from what is compared."""

from __future__ import annotations

import math

import torch

STREAMED_BYTES = 256 * 2**20
MAX_COPIES = 64


def weight_copies(bytes_per_copy: int, make) -> list:
    """``make()`` called once per copy: enough copies to stream STREAMED_BYTES, at least 1, at most MAX_COPIES."""
    return [make() for _ in range(max(1, min(MAX_COPIES, math.ceil(STREAMED_BYTES / bytes_per_copy))))]


def capture(calls) -> torch.cuda.CUDAGraph:
    """Runs each call once (compiling Triton kernels, settling cuBLAS's and cuDNN's choices), then captures
    them all in one graph."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return graph


def seconds_per_call(graph, n_calls: int, replays: int = 20) -> float:
    """Mean seconds per captured call over ``replays`` replays after one untimed replay, timed with events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / replays / n_calls


def benchmark_calls(benchmark, calls) -> float:
    """pytest-benchmark rounds of whole-graph replays (what its table shows), then seconds per call by
    ``seconds_per_call``, recorded in ``extra_info`` (``us_per_call``, ``weight_copies``) and returned."""
    graph = capture(calls)

    def replay():
        graph.replay()
        torch.cuda.synchronize()

    benchmark.pedantic(replay, rounds=10, warmup_rounds=1)
    seconds = seconds_per_call(graph, len(calls))
    benchmark.extra_info.update(us_per_call=seconds * 1e6, weight_copies=len(calls))
    return seconds
