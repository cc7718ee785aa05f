"""quant::conv2d_* on CPU, every ISA path, against the float64 reference."""

import pytest
import torch

from quantkernels import reference
from quantkernels.formats import quantize_weight
from quantkernels.testing import assert_close_to_reference, conv2d_bound

CASES = [
    # (batch, cin, cout, hw, kernel, stride, padding, dilation, groups)
    (1, 3, 8, 9, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (2, 8, 12, 10, (1, 1), (1, 1), (0, 0), (1, 1), 1),
    (2, 6, 6, 11, (3, 3), (2, 2), (1, 1), (1, 1), 6),  # depthwise
    (1, 5, 7, 12, (5, 5), (1, 2), (2, 1), (1, 1), 1),
    (1, 4, 6, 15, (7, 7), (1, 1), (3, 3), (2, 1), 2),
    (3, 16, 10, 7, (3, 1), (1, 1), (1, 0), (1, 1), 2),
]


@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, True), (4, None, False), (4, 32, True)])
@pytest.mark.parametrize("act_int8", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(isa, bits, group_size, symmetric, act_int8, case, rng):
    b, cin, cout, hw, kernel, stride, padding, dilation, groups = case
    x = torch.randn(b, cin, hw, hw + 1, generator=rng)
    w = torch.randn(cout, cin // groups, *kernel, generator=rng)
    qw = quantize_weight(w, bits=bits, group_size=group_size, symmetric=symmetric)
    bias = torch.randn(cout, generator=rng) if b % 2 else None
    args = (bias, list(kernel), list(stride), list(padding), list(dilation), groups, act_int8)
    if bits == 8:
        out = torch.ops.quant.conv2d_int8(x, qw.qdata, qw.scale, *args)
    else:
        out = torch.ops.quant.conv2d_int4(x, qw.qdata, qw.scale, qw.zero_point, *args)
    want = reference.conv2d(bits, x.double(), qw.qdata, qw.scale, qw.zero_point, *args)
    bound = conv2d_bound(bits, x, qw.qdata, qw.scale, qw.zero_point, *args)
    assert_close_to_reference(out, want, bound, x.dtype, act_int8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_dtypes_and_memory_format(isa, dtype, channels_last, rng):
    x = torch.randn(2, 8, 9, 9, generator=rng).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    qw = quantize_weight(torch.randn(16, 8, 3, 3, generator=rng), bits=8)
    args = (None, [3, 3], [1, 1], [1, 1], [1, 1], 1, False)
    out = torch.ops.quant.conv2d_int8(x, qw.qdata, qw.scale, *args)
    want = reference.conv2d(8, x.double(), qw.qdata, qw.scale, None, *args)
    assert_close_to_reference(out, want, conv2d_bound(8, x, qw.qdata, qw.scale, None, *args), dtype)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
