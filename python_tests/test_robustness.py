"""Property-based checks of every linear op against the reference, plus threads, leaks and huge indices."""

import gc
import resource
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import quantkernels
from quantkernels import reference
from quantkernels.formats import GROUP_SIZES, quantize_weight
from quantkernels.testing import assert_close_to_reference, linear_bound

WEIGHT_FORMATS = [(8, True), (4, True), (4, False)]


def run_linear(x, qw, bias, act_int8):
    return quantkernels.linear(x, qw, bias, act_int8=act_int8)


@st.composite
def linear_problems(draw):
    bits, symmetric = draw(st.sampled_from(WEIGHT_FORMATS))
    return dict(
        bits=bits,
        symmetric=symmetric,
        group_size=draw(st.sampled_from((None,) + GROUP_SIZES)),
        lead=draw(st.sampled_from([(), (0,), (1,), (3,), (2, 3), (1, 1, 5)])),
        n=draw(st.integers(1, 80)),
        k=draw(st.integers(1, 700)),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        act_int8=draw(st.booleans()),
        bias=draw(st.booleans()),
        layout=draw(st.sampled_from(["contiguous", "transposed", "strided"])),
        isa=draw(st.sampled_from(quantkernels.supported_isas())),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_input(lead, k, dtype, layout, gen):
    if layout == "transposed" and lead:
        x = torch.randn(*lead[:-1], k, lead[-1], generator=gen).to(dtype).transpose(-1, -2)
    elif layout == "strided":
        x = torch.randn(*lead, 2 * k, generator=gen).to(dtype)[..., ::2]
    else:
        x = torch.randn(*lead, k, generator=gen).to(dtype)
    return x


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=linear_problems())
def test_linear_property(p):
    gen = torch.Generator().manual_seed(p["seed"])
    x = make_input(p["lead"], p["k"], p["dtype"], p["layout"], gen)
    w = torch.randn(p["n"], p["k"], generator=gen) * torch.rand(p["n"], 1, generator=gen)
    qw = quantize_weight(w, bits=p["bits"], group_size=p["group_size"], symmetric=p["symmetric"])
    bias = torch.randn(p["n"], generator=gen).to(p["dtype"]) if p["bias"] else None
    before = quantkernels.active_isa()
    quantkernels.set_isa(p["isa"])
    try:
        out = run_linear(x, qw, bias, p["act_int8"])
    finally:
        quantkernels.set_isa(before)
    want = reference.linear(p["bits"], x.double(), qw.qdata, qw.scale, qw.zero_point, bias, p["act_int8"])
    bound = linear_bound(p["bits"], x, qw.qdata, qw.scale, qw.zero_point, bias, p["act_int8"])
    assert_close_to_reference(out, want, bound, p["dtype"], p["act_int8"])


def test_eight_threads_match_one(rng):
    w1 = quantize_weight(torch.randn(256, 384, generator=rng), bits=4, group_size=64, symmetric=False)
    w2 = quantize_weight(torch.randn(96, 256, generator=rng), bits=8)

    def model(x):
        h = torch.relu(quantkernels.linear(x, w1, act_int8=True))
        return quantkernels.linear(h, w2)

    inputs = [torch.randn(7, 384, generator=rng) for _ in range(8)]
    expected = [model(x) for x in inputs]
    results = [None] * 8

    def worker(i):
        results[i] = [model(inputs[i]) for _ in range(20)]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        for r in results[i]:
            assert torch.equal(r, expected[i])


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def test_ten_thousand_calls_leave_memory_flat(rng):
    x = torch.randn(4, 128, generator=rng)
    img = torch.randn(1, 4, 6, 6, generator=rng)
    q4 = quantize_weight(torch.randn(32, 128, generator=rng), bits=4, group_size=32, symmetric=False)
    q8 = quantize_weight(torch.randn(32, 128, generator=rng), bits=8)
    c8 = quantize_weight(torch.randn(8, 4, 3, 3, generator=rng), bits=8)
    c4 = quantize_weight(torch.randn(8, 4, 3, 3, generator=rng), bits=4, group_size=None, symmetric=False)
    calls = [
        lambda: quantkernels.linear(x, q4),
        lambda: quantkernels.linear(x, q4, act_int8=True),
        lambda: quantkernels.linear(x, q8),
        lambda: quantkernels.linear(x, q8, act_int8=True),
        lambda: quantkernels.conv2d(img, c8, padding=(1, 1), act_int8=True),
        lambda: quantkernels.conv2d(img, c4),
    ]
    for call in calls:
        for _ in range(500):  # warm-up: allocator caches, thread pool
            call()
        gc.collect()
        before = _rss_mb()
        for _ in range(10_000):
            call()
        gc.collect()
        assert _rss_mb() - before < 8, f"resident memory grew by {_rss_mb() - before:.1f} MiB over 10,000 calls"


@pytest.mark.parametrize("bits", [8, 4])
def test_index_arithmetic_past_2_31(bits):
    """A weight of more than 2^31 bytes: rows whose byte offsets pass 2^31 must be read from the right place."""
    k = 32768
    n = (2**31 // (k if bits == 8 else k // 2)) + 64
    gen = torch.Generator().manual_seed(7)
    if bits == 8:
        qdata = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    else:
        qdata = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    assert qdata.numel() > 2**31
    scale = torch.rand(n, k // 128, generator=gen) * 0.01 + 0.001
    x = torch.randn(1, k, generator=gen)
    op = torch.ops.quant.linear_int8 if bits == 8 else torch.ops.quant.linear_int4
    args = (x, qdata, scale, None) if bits == 8 else (x, qdata, scale, None, None)
    out = op(*args)
    rows = torch.tensor([0, n // 2, n - 65, n - 1])  # the last rows start past byte 2^31
    want = reference.linear(bits, x.double(), qdata[rows], scale[rows], None, None)
    bound = linear_bound(bits, x, qdata[rows], scale[rows], None, None)
    assert_close_to_reference(out[:, rows], want, bound, torch.float32)
    del qdata
    gc.collect()
