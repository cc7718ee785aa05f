"""Shared benchmark machinery: every benchmark defeats the cache, warms up and reports the same way.

Cache: a benchmark's weights are rotated over ``ceil(ROTATION_BYTES / weight bytes)`` distinct copies, used
in turn, so that between two touches of one copy (its creation, or its previous call) the other copies stream
``ROTATION_BYTES`` through the caches; each call then reads its weights from memory, as a layer does in a real
model whose weights do not fit in cache. Activations are not rotated: a layer's input was just written by the
layer before it and is cache-hot in a real model too.

``ROTATION_BYTES = min(max(4 * L3, 2 GiB), 6 GiB)``: four times the last-level cache makes an LRU-ish cache
forget a copy before it comes round again; the 2 GiB floor covers machines whose reported L3 is small or
missing; the 6 GiB cap keeps the benchmark inside a shared machine's memory (this one reports a 480 MiB L3,
so 2 GiB). The copies of one weight are kept across consecutive benchmarks that share it (the same weight at
M = 1, 8, 32, 128), and only one weight's copies are held at a time. Copies that are costly to build
(torch.ao modules, which prepack their weight) stop building after ``BUILD_SECONDS``; such a benchmark
records ``extra_info["cache"] = "warm: ..."`` and the report flags its ratios.

Timing: ``benchmark.pedantic`` with one call per round and a fresh weight copy per round (the copy is picked
outside the timed region). Two calls (lazy initialisation, then one timed to size the run) and
``WARMUP_SECONDS`` of warm-up calls come first, then as many rounds
as fit in ``--benchmark-max-time`` (default 1 s), at least ``--benchmark-min-rounds`` (default 5), at most
``MAX_ROUNDS``. The report uses the median.

Allocator: glibc's malloc maps each allocation above its mmap threshold afresh (page faults on every first
write) and raises that threshold whenever such a block is freed, so a layer's 6 MB output cost 1568 page
faults per call or none depending on which benchmark had run before it (the first batch-8 layer of a run:
1.5-11 ms a call against 1.9). The run fixes the thresholds at the values they reach in a process that has
run a while (mmap above 32 MiB, trim above 64 MiB), the same for every implementation.

``extra_info``: ``impl`` (what ran), ``ours``, ``GFLOP/s``, ``GB/s`` (weight bytes read per second),
``weight_bytes``, ``floor_s`` (weight bytes / the streaming bandwidth measured in this run: the time no kernel
reading those weights from memory can beat), ``floor_ratio`` (median / floor_s), ``cache``, and ``targets``
(the issue's goals, which the report checks).

With ``--benchmark-disable`` (CI) each benchmark builds one weight copy and calls its kernel once.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import itertools
import math
import statistics
import time
from typing import Any, Callable, Optional, Sequence

import pytest
import torch

GiB = 1 << 30
WARMUP_SECONDS = 0.3
MAX_ROUNDS = 300
BUILD_SECONDS = 30.0
BANDWIDTH_PASSES = 7


def l3_bytes() -> int:
    """Size of the last-level cache, from sysfs (0 if the kernel does not say)."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
    except OSError:
        return 0
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


ROTATION_BYTES = min(max(4 * l3_bytes(), 2 * GiB), 6 * GiB)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def cpu_flags() -> str:
    """The instruction-set extensions that matter to these kernels, as /proc/cpuinfo names them."""
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return " ".join(flag for flag in wanted if flag in have)
    except OSError:
        pass
    return ""


_run_facts: dict = {}


def measure_bandwidth(nbytes: int, passes: int) -> float:
    """Bytes per second of a streaming read on torch's threads: the faster of two plain readers of an
    ``nbytes`` float32 buffer, ``torch.sum`` over all of it and matrix-vector products (MKL's GEMV) over its
    4096x4096 blocks in turn, whichever streams better on this machine (here the GEMVs: ~22 GB/s against ~17
    for the sum). Taking the faster keeps the floor honest: no kernel looks close to it because one reader
    is slow."""
    buf = torch.ones(max(1, nbytes // 4 // 4096**2), 4096, 4096, dtype=torch.float32)
    vec = torch.ones(4096, dtype=torch.float32)

    def gemvs():
        for block in buf:
            torch.mv(block, vec)

    best = 0.0
    for read in (buf.sum, gemvs):
        read()  # first touch and thread-pool start-up
        times = []
        for _ in range(passes):
            start = time.perf_counter()
            read()
            times.append(time.perf_counter() - start)
        best = max(best, buf.numel() * 4 / statistics.median(times))
    return best


@pytest.fixture(scope="session")
def memory_bandwidth(request) -> Optional[float]:
    """Streaming-read bandwidth in bytes/s, measured once per run over twice the L3 (None when disabled)."""
    if request.config.getoption("benchmark_disable"):
        return None
    nbytes = min(max(2 * l3_bytes(), GiB // 4), ROTATION_BYTES)
    bandwidth = measure_bandwidth(nbytes, BANDWIDTH_PASSES)
    _run_facts.update(bandwidth_GBps=bandwidth / 1e9, bandwidth_buffer_bytes=nbytes)
    return bandwidth


def settle_allocator() -> bool:
    """Fix glibc's mmap and trim thresholds (see the module docstring); False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 64 << 20))
    except (OSError, AttributeError):
        return False


@pytest.fixture(scope="session")
def settled_allocator(request) -> None:
    """Settles the allocator once per timed run, before any benchmark is timed."""
    if not request.config.getoption("benchmark_disable"):
        _run_facts.update(allocator_settled=settle_allocator())


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """The facts the report needs about the machine and the run, beside pytest-benchmark's own."""
    import quantkernels

    output_json["quantkernels"] = dict(
        isa=quantkernels.active_isa(),
        cpu_model=cpu_model(),
        cpu_flags=cpu_flags(),
        torch_threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        l3_bytes=l3_bytes(),
        rotation_bytes=ROTATION_BYTES,
        **_run_facts,
    )


@contextlib.contextmanager
def one_thread():
    """Copies are thousands of small memcpys; on torch's thread pool each pays a fork-join, which costs
    milliseconds when the machine is oversubscribed (measured: 2 GiB of 300 KB copies took 54 s on two threads
    under load, 3.3 s on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class WeightCopies:
    """Distinct copies of one benchmark weight, kept while consecutive benchmarks use the same weight.

    Only one weight's copies are held at a time: asking for another key frees the previous copies first.
    """

    def __init__(self):
        self.key = None
        self.copies: list = []
        self.build_seconds = 0.0

    def get(self, key, make: Callable[[], Any], copy: Callable[[Any], Any], count: int) -> list:
        if key != self.key:
            self.clear()  # free the previous weight's copies before building this one's
            start = time.perf_counter()
            first = make()
            self.key, self.copies, self.build_seconds = key, [first], time.perf_counter() - start
        start = time.perf_counter()
        with one_thread():
            while len(self.copies) < count and self.build_seconds + time.perf_counter() - start < BUILD_SECONDS:
                self.copies.append(copy(self.copies[0]))
        self.build_seconds += time.perf_counter() - start
        return self.copies[:count]

    def clear(self):
        self.key, self.copies, self.build_seconds = None, [], 0.0


@pytest.fixture(scope="session")
def weight_copies():
    store = WeightCopies()
    yield store
    store.clear()


def clone_tensors(state):
    """A copy of a weight state made of tensors (a tensor, a tuple of them, or a dataclass holding them)."""
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, tuple):
        return tuple(clone_tensors(s) for s in state)
    if dataclasses.is_dataclass(state):
        return dataclasses.replace(
            state, **{f.name: clone_tensors(getattr(state, f.name)) for f in dataclasses.fields(state)
                      if isinstance(getattr(state, f.name), torch.Tensor)}
        )
    raise TypeError(f"state: got {type(state).__name__}, expected a tensor, tuple of tensors or dataclass")


@dataclasses.dataclass(frozen=True)
class Target:
    """A goal from an issue: ``min_speedup`` over the baseline ``vs`` in the same group, or, with
    ``vs="floor"``, a median at most ``max_floor_ratio`` times the memory floor."""

    vs: str
    min_speedup: Optional[float] = None
    max_floor_ratio: Optional[float] = None
    issue: int = 0

    def as_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


class Bench:
    """Runs one benchmark case the shared way; see the module docstring."""

    def __init__(self, benchmark, weight_copies: WeightCopies, bandwidth: Optional[float], config):
        self.benchmark = benchmark
        self.weight_copies = weight_copies
        self.bandwidth = bandwidth
        self.max_time = float(config.getoption("benchmark_max_time"))
        self.min_rounds = int(config.getoption("benchmark_min_rounds"))

    def __call__(
        self,
        *,
        group: str,
        impl: str,
        ours: bool,
        call: Callable[[Any], Any],
        make: Callable[[], Any],
        weight_bytes: Callable[[Any], int],
        flops: int,
        copy: Callable[[Any], Any] = clone_tensors,
        key=None,
        targets: Sequence[Target] = (),
        **info,
    ):
        """``make()`` builds the weight state, ``copy(state)`` another distinct one, ``call(state)`` runs the
        kernel once on it; ``key`` names the weight state (by default the implementation and group), so that
        consecutive benchmarks with equal keys share one set of copies."""
        bm = self.benchmark
        bm.group = group
        key = (impl, group) if key is None else key
        if bm.disabled:
            bm.pedantic(call, args=(self.weight_copies.get(key, make, copy, 1)[0],))
            return

        nbytes = weight_bytes(self.weight_copies.get(key, make, copy, 1)[0])
        wanted = math.ceil(ROTATION_BYTES / nbytes)
        copies = self.weight_copies.get(key, make, copy, wanted)
        turn = itertools.cycle(copies)
        call(next(turn))  # lazy initialisation (thread pool, primitive caches) is not what we measure
        start = time.perf_counter()
        call(next(turn))
        estimate = time.perf_counter() - start
        for _ in range(min(MAX_ROUNDS, math.ceil(WARMUP_SECONDS / estimate))):
            call(next(turn))
        rounds = min(MAX_ROUNDS, max(self.min_rounds, math.ceil(self.max_time / estimate)))
        bm.pedantic(call, setup=lambda: ((next(turn),), {}), rounds=rounds)

        median = bm.stats.stats.median
        floor = nbytes / self.bandwidth
        cold = len(copies) == wanted
        bm.extra_info.update(
            impl=impl,
            ours=ours,
            flops=flops,
            weight_bytes=nbytes,
            copies=len(copies),
            cache="cold" if cold else f"warm: {len(copies)} copies, {len(copies) * nbytes / 2**20:.0f} MiB rotated",
            **{"GFLOP/s": flops / median / 1e9, "GB/s": nbytes / median / 1e9},
            floor_s=floor,
            floor_ratio=median / floor,
            targets=[t.as_dict() for t in targets],
            **info,
        )


def target_marks(targets_by_impl: dict, impl: str) -> list:
    """[pytest.mark.targets] for a case whose benchmark a target in its group reads: one with targets of its own,
    or the baseline one of them is measured against. targets_by_impl: each implementation's targets in the
    group."""
    read = {t.vs for targets in targets_by_impl.values() for t in targets}
    return [pytest.mark.targets] if targets_by_impl.get(impl) or impl in read else []


@pytest.fixture
def bench(benchmark, weight_copies, memory_bandwidth, settled_allocator, request):
    return Bench(benchmark, weight_copies, memory_bandwidth, request.config)


def pytest_configure(config):
    config.addinivalue_line("markers", "targets: a benchmark an issue's speed target reads (ours or its baseline); "
                            "`-m targets` runs just those")
    # torch.ao.quantization warns of its deprecation on every module and quantized tensor the baselines build;
    # the baselines are there because users still run them.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:torch.ao")
    config.addinivalue_line("filterwarnings", "ignore:.*torch.ao.quantization is deprecated")
    config.addinivalue_line("filterwarnings", "ignore:.*quantized tensor creation functions")
