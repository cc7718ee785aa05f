"""quant::linear_* on CPU, every ISA path, against the float64 reference."""

import pytest
import torch

from quantkernels import reference
from quantkernels.formats import quantize_weight
from quantkernels.testing import assert_close_to_reference, linear_bound

OPS = {
    (8, False): torch.ops.quant.linear_int8,
    (8, True): torch.ops.quant.linear_w8a8,
    (4, False): torch.ops.quant.linear_int4,
    (4, True): torch.ops.quant.linear_w4a8,
}
WEIGHTS = [(8, None, True), (8, 128, True), (4, None, True), (4, 32, False), (4, 64, True), (4, 128, True),
           (4, 128, False), (4, 256, False)]


def call(bits, act_int8, x, qw, bias):
    if bits == 8:
        return OPS[bits, act_int8](x, qw.qdata, qw.scale, bias)
    return OPS[bits, act_int8](x, qw.qdata, qw.scale, qw.zero_point, bias)


def check(bits, act_int8, x, qw, bias):
    out = call(bits, act_int8, x, qw, bias)
    want = reference.linear(bits, x.double(), qw.qdata, qw.scale, qw.zero_point, bias, act_int8)
    bound = linear_bound(bits, x, qw.qdata, qw.scale, qw.zero_point, bias, act_int8)
    assert_close_to_reference(out, want, bound, x.dtype, act_int8)
    return out


@pytest.mark.parametrize("bits,group_size,symmetric", WEIGHTS)
@pytest.mark.parametrize("act_int8", [False, True])
@pytest.mark.parametrize(
    "m,n,k", [(1, 1, 1), (1, 33, 64), (3, 17, 100), (5, 21, 134), (8, 64, 257), (9, 23, 391), (33, 48, 512), (64, 40, 1000)]
)
def test_matches_reference(isa, bits, group_size, symmetric, act_int8, m, n, k, rng):
    x = torch.randn(m, k, generator=rng)
    qw = quantize_weight(torch.randn(n, k, generator=rng), bits=bits, group_size=group_size, symmetric=symmetric)
    bias = torch.randn(n, generator=rng) if (m + n) % 2 else None
    check(bits, act_int8, x, qw, bias)


@pytest.mark.parametrize("bits,group_size,symmetric", WEIGHTS)
@pytest.mark.parametrize("m", [128, 130])
def test_int8_activations_tall_inputs(isa, bits, group_size, symmetric, m, rng):
    """Batches the SIMD int8-activation kernels block over M (6 or 4 rows a tile) with N (70: not a multiple of
    the 16- or 32-column panels) and K (1100: over two 512-element K blocks) ragged."""
    x = torch.randn(m, 1100, generator=rng)
    qw = quantize_weight(torch.randn(70, 1100, generator=rng), bits=bits, group_size=group_size, symmetric=symmetric)
    check(bits, True, x, qw, torch.randn(70, generator=rng))


@pytest.mark.parametrize("bits,group_size,symmetric", WEIGHTS)
def test_int8_activations_tall_narrow(isa, bits, group_size, symmetric, rng):
    """More than 4 rows per output column: the threads split the rows and each packs every column; over 256
    rows the AMX kernel reuses one packing for several row blocks. N = 37 ends inside a 32-column pair and
    K = 300 needs padding to the 64-byte tile step (rows staged, not read in place)."""
    x = torch.randn(600, 300, generator=rng)
    qw = quantize_weight(torch.randn(37, 300, generator=rng), bits=bits, group_size=group_size, symmetric=symmetric)
    check(bits, True, x, qw, torch.randn(37, generator=rng))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,group_size,symmetric", WEIGHTS)
@pytest.mark.parametrize("m,n", [(48, 70), (130, 600)])
def test_weight_only_tall_inputs(isa, dtype, bits, group_size, symmetric, m, n, rng):
    """From 48 rows the weight-only ops run float GEMMs on weight panels decoded per call (bf16/fp16 int4 on
    the amx path excepted): N = 70 gives two panels of unequal size, N = 600 several panels per thread; K = 1100
    ends inside a group of every size."""
    x = torch.randn(m, 1100, generator=rng).to(dtype)
    qw = quantize_weight(torch.randn(n, 1100, generator=rng), bits=bits, group_size=group_size, symmetric=symmetric)
    check(bits, False, x, qw, torch.randn(n, generator=rng).to(dtype))


@pytest.mark.parametrize("m", [1, 64])
@pytest.mark.parametrize("act_int8", [False, True])
def test_inference_mode(m, act_int8, rng):
    """Under torch.inference_mode the output is an inference tensor; no path (the panel GEMMs run on worker
    threads, which do not inherit the mode) may write it in a way the mode forbids."""
    x = torch.randn(m, 300, generator=rng)
    qw = quantize_weight(torch.randn(40, 300, generator=rng), bits=4, group_size=32)
    with torch.inference_mode():
        out = check(4, act_int8, x, qw, torch.randn(40, generator=rng))
    assert out.is_inference()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, True), (4, 32, True), (4, 128, False)])
@pytest.mark.parametrize("act_int8", [False, True])
def test_dtypes_and_batched_inputs(isa, dtype, bits, group_size, symmetric, act_int8, rng):
    x = torch.randn(2, 5, 384, generator=rng).to(dtype)
    qw = quantize_weight(torch.randn(70, 384, generator=rng), bits=bits, group_size=group_size, symmetric=symmetric)
    bias = torch.randn(70, generator=rng).to(dtype)
    out = check(bits, act_int8, x, qw, bias)
    assert out.shape == (2, 5, 70)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,group_size", [(4, 128), (8, None)])
@pytest.mark.parametrize("m", [1, 8])
def test_long_rows(isa, dtype, bits, group_size, m, rng):
    """K = 4096, as in a 7B model's projections: the longest accumulation the tolerance has to cover."""
    x = torch.randn(m, 4096, generator=rng).to(dtype)
    qw = quantize_weight(torch.randn(24, 4096, generator=rng), bits=bits, group_size=group_size)
    check(bits, False, x, qw, torch.randn(24, generator=rng))


def test_zero_point_outside_the_format_follows_the_formula(isa, rng):
    """The ops do not scan zero points (0..15 in the format): a larger one still means (code - zero) * scale in
    every weight-only kernel, never a read past a decode table."""
    x = torch.randn(3, 256, generator=rng)
    qw = quantize_weight(torch.randn(20, 256, generator=rng), bits=4, group_size=128, symmetric=False)
    qw.zero_point[::3] = 200
    for dtype in (torch.float32, torch.bfloat16):
        check(4, False, x.to(dtype), qw, None)


@pytest.mark.parametrize("act_int8", [False, True])
def test_non_contiguous_input(isa, act_int8, rng):
    base = torch.randn(256, 12, generator=rng)
    x = base.T[:, ::2]  # (12, 128) with strides (1, 24)
    assert not x.is_contiguous()
    qw = quantize_weight(torch.randn(20, 128, generator=rng), bits=4, group_size=64)
    check(4, act_int8, x, qw, None)


@pytest.mark.parametrize("act_int8", [False, True])
def test_empty_batch(act_int8):
    qw = quantize_weight(torch.randn(20, 64), bits=4, group_size=32)
    out = call(4, act_int8, torch.randn(0, 64), qw, None)
    assert out.shape == (0, 20)


def test_nan_in_activation_propagates_per_row(isa, rng):
    x = torch.randn(3, 64, generator=rng)
    x[1, 7] = float("nan")
    qw = quantize_weight(torch.randn(8, 64, generator=rng), bits=4, group_size=32)
    for act_int8 in (False, True):
        out = call(4, act_int8, x, qw, None)
        assert out[1].isnan().all() and torch.isfinite(out[[0, 2]]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threads_give_same_result(dtype, rng):
    x = torch.randn(5, 512, generator=rng).to(dtype)
    qw = quantize_weight(torch.randn(300, 512, generator=rng), bits=4, group_size=128)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = call(4, False, x, qw, None)
        torch.set_num_threads(2)
        two = call(4, False, x, qw, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
