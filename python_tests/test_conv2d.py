"""quant::conv2d_* on CPU, every ISA path, against the float64 reference.

The cases reach every path of csrc/core/conv2d.cpp: depthwise (direct, NCHW planes or NHWC rows), on AMX or
AVX-512 with int8 activations the planar product of stride-1 convs (NCHW or NHWC; 1x1 unpadded quantized
chunk by chunk; with taps or padding gathered from shifted quad planes), 1x1 stride 1 (the activation is the GEMM
input), im2col with the weight reordered (one scale group per channel) or gathered (several groups along K),
several bands per thread and the threads splitting output channels; and the weight prepared once or per call.
"""

import dataclasses
import gc

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import quantkernels
from quantkernels import ops, reference
from quantkernels.formats import quantize_weight
from quantkernels.testing import assert_close_to_reference, conv2d_bound

# (bits, group_size, symmetric): int8 per channel, int4 asymmetric per channel (both reordered to tap-major),
# int4 in groups of 32 along K (gathered im2col).
WEIGHT_FORMATS = [(8, None, True), (4, None, False), (4, 32, True)]

CASES = {
    # name: (batch, cin, cout, (h, w), kernel, stride, padding, dilation, groups)
    "3x3": (1, 3, 8, (9, 10), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "1x1": (2, 13, 19, (6, 7), (1, 1), (1, 1), (0, 0), (1, 1), 1),
    "1x1_stride2": (2, 16, 24, (9, 9), (1, 1), (2, 2), (0, 0), (1, 1), 1),  # planar over the pixels read
    "1x1_stride3x2": (2, 12, 10, (10, 41), (1, 1), (3, 2), (0, 0), (1, 1), 1),  # rows past two vectors
    "5x5": (1, 5, 7, (12, 13), (5, 5), (1, 2), (2, 1), (1, 1), 1),
    "7x7_stride2": (1, 3, 16, (17, 16), (7, 7), (2, 2), (3, 3), (1, 1), 1),
    "stride2_dilation2": (1, 6, 9, (11, 12), (3, 3), (2, 2), (2, 2), (2, 2), 1),
    "7x7_groups2": (1, 4, 6, (15, 16), (7, 7), (1, 1), (3, 3), (2, 1), 2),
    "3x1_groups2": (3, 16, 10, (7, 8), (3, 1), (1, 1), (1, 0), (1, 1), 2),
    "depthwise": (2, 24, 24, (10, 37), (3, 3), (1, 1), (1, 1), (1, 1), 24),
    "depthwise_stride2": (2, 6, 6, (11, 12), (3, 3), (2, 2), (1, 1), (1, 1), 6),
    "depthwise_5x5_dilation2": (1, 9, 9, (13, 12), (5, 5), (1, 1), (4, 4), (2, 2), 9),
    "depthwise_7x7": (1, 17, 17, (9, 10), (7, 7), (2, 1), (3, 3), (1, 1), 17),
    "depthwise_14x14": (2, 20, 20, (14, 14), (3, 3), (1, 1), (1, 1), (1, 1), 20),  # blocks of 7 rows
    "multiplier2": (2, 8, 16, (6, 6), (3, 3), (1, 1), (1, 1), (1, 1), 8),
    "many_pixels": (3, 19, 37, (20, 21), (3, 3), (1, 1), (1, 1), (1, 1), 1),  # 1260 GEMM rows: several bands
    "many_images": (9, 17, 20, (9, 11), (3, 3), (1, 1), (1, 1), (1, 1), 1),  # bands of whole 99-pixel images
    "1x1_many_pixels": (3, 70, 37, (20, 21), (1, 1), (1, 1), (0, 0), (1, 1), 1),  # planar: 2 K steps, 2 chunks
    "1x1_padded": (1, 5, 6, (6, 7), (1, 1), (1, 1), (1, 2), (1, 1), 1),  # planar: one tap, shifted
    "3x3_dilation2": (2, 10, 12, (13, 11), (3, 3), (1, 1), (2, 1), (2, 1), 1),  # planar: taps 2 rows apart
    "3x3_valid": (2, 6, 40, (12, 40), (3, 3), (1, 1), (0, 0), (1, 1), 1),  # output rows narrower than input's
    # Small images (here and "1x1"): on AVX-512 VNNI the planar chunks run across images, 49 pixels apart here.
    "7x7_images": (5, 24, 20, (7, 7), (3, 3), (1, 1), (1, 1), (1, 1), 1),
}


def make_problem(case, bits, group_size, symmetric, rng, dtype=torch.float32, channels_last=False, bias=None):
    b, cin, cout, (h, w), kernel, stride, padding, dilation, groups = case
    x = torch.randn(b, cin, h, w, generator=rng).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin // groups, *kernel, generator=rng)
    qw = quantize_weight(weight, bits=bits, group_size=group_size, symmetric=symmetric)
    if bias is None:
        bias = b % 2 == 1
    bias_t = torch.randn(cout, generator=rng).to(dtype) if bias else None
    return x, qw, bias_t, (list(kernel), list(stride), list(padding), list(dilation), groups)


def run_and_check(x, qw, bias, geometry, act_int8):
    out = quantkernels.conv2d(x, qw, bias, *geometry[1:], act_int8=act_int8)
    args = (bias, *geometry, act_int8)
    want = reference.conv2d(qw.bits, x.double(), qw.qdata, qw.scale, qw.zero_point, *args)
    bound = conv2d_bound(qw.bits, x, qw.qdata, qw.scale, qw.zero_point, *args)
    assert_close_to_reference(out, want, bound, x.dtype, act_int8)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return out


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("bits,group_size,symmetric", WEIGHT_FORMATS)
@pytest.mark.parametrize("act_int8", [False, True], ids=["w_only", "a8"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(isa, name, act_int8, bits, group_size, symmetric, channels_last, rng):
    x, qw, bias, geometry = make_problem(CASES[name], bits, group_size, symmetric, rng, channels_last=channels_last)
    run_and_check(x, qw, bias, geometry, act_int8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("act_int8", [False, True], ids=["w_only", "a8"])
@pytest.mark.parametrize("name", ["3x3", "1x1", "depthwise_stride2"])
def test_half_dtypes(isa, name, act_int8, channels_last, dtype, rng):
    x, qw, bias, geometry = make_problem(CASES[name], 8, None, True, rng, dtype, channels_last, bias=True)
    run_and_check(x, qw, bias, geometry, act_int8)


@pytest.mark.parametrize("act_int8", [False, True], ids=["w_only", "a8"])
@pytest.mark.parametrize("name", ["3x3", "1x1", "depthwise"])
def test_non_contiguous_input(name, act_int8, rng):
    x, qw, bias, geometry = make_problem(CASES[name], 4, None, False, rng)
    wide = torch.randn(x.shape[0], x.shape[1], x.shape[2], 2 * x.shape[3], generator=rng)
    out = run_and_check(wide[..., ::2], qw, bias, geometry, act_int8)
    assert out.is_contiguous()


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("act_int8", [False, True], ids=["w_only", "a8"])
@pytest.mark.parametrize("name", ["3x3", "1x1", "many_pixels", "many_images", "1x1_many_pixels", "3x1_groups2",
                                  "depthwise"])
def test_thread_counts(name, act_int8, threads, rng):
    """One thread; and three, which split few pixels by output channel and many pixels into uneven bands."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, qw, bias, geometry = make_problem(CASES[name], 8, None, True, rng)
        run_and_check(x, qw, bias, geometry, act_int8)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("act_int8", [False, True], ids=["w_only", "a8"])
def test_empty_batch(act_int8, channels_last, rng):
    x, qw, bias, geometry = make_problem(CASES["3x3"], 8, None, True, rng, channels_last=channels_last)
    empty = x[:0]
    out = quantkernels.conv2d(empty, qw, bias, *geometry[1:], act_int8=act_int8)
    assert out.shape == (0, 8, 9, 10)
    assert out.dtype == x.dtype


def stored_copy(qw, inference=False):
    """The same weight in fresh tensors; as inference tensors, which the binding cannot track, so every call
    prepares it anew (the per-call path)."""
    with torch.inference_mode(inference):
        return dataclasses.replace(qw, qdata=qw.qdata.clone(), scale=qw.scale.clone(),
                                   zero_point=None if qw.zero_point is None else qw.zero_point.clone())


@pytest.mark.parametrize("bits,group_size,symmetric", WEIGHT_FORMATS)
@pytest.mark.parametrize("act_int8", [False, True], ids=["w_only", "a8"])
@pytest.mark.parametrize("name", ["3x3", "1x1", "7x7_groups2", "many_pixels", "many_images", "depthwise"])
def test_prepared_weight_matches_per_call(isa, name, act_int8, bits, group_size, symmetric, rng):
    """A weight prepared once (ops.prepack_conv2d, the first call) gives the bits that preparing per call gives,
    and both match the reference."""
    x, qw, bias, geometry = make_problem(CASES[name], bits, group_size, symmetric, rng)
    kernel, stride, padding, dilation, groups = geometry
    held = ops.prepack_conv2d(qw, stride, padding, groups, act_int8)
    reordered = geometry[0] != [1, 1] and group_size is None and "depthwise" not in name
    if reordered:  # a weight the GEMM reads in another order is held so
        assert held > 0
    prepared = run_and_check(x, qw, bias, geometry, act_int8)
    per_call = quantkernels.conv2d(x, stored_copy(qw, inference=True), bias, *geometry[1:], act_int8=act_int8)
    assert torch.equal(prepared, per_call)


@pytest.mark.parametrize("write", ["in_place", "through_data", "replaced"])
def test_prepared_weight_follows_writes(isa, write, rng):
    """Writing the stored tensors after a call (in place, through .data, which torch's version counter misses,
    or a new tensor) is seen by the next call, never answered from the stale layout."""
    x, qw, bias, geometry = make_problem(CASES["many_pixels"], 8, None, True, rng)
    quantkernels.conv2d(x, qw, bias, *geometry[1:], act_int8=True)
    other = quantize_weight(torch.randn(qw.shape, generator=rng), bits=8)
    if write == "in_place":
        qw.qdata.copy_(other.qdata)
        qw.scale.copy_(other.scale)
    elif write == "through_data":
        qw.qdata.data.copy_(other.qdata)
        qw.scale.data.copy_(other.scale)
    else:
        qw = other
    out = quantkernels.conv2d(x, qw, bias, *geometry[1:], act_int8=True)
    fresh = quantkernels.conv2d(x, stored_copy(qw), bias, *geometry[1:], act_int8=True)
    assert torch.equal(out, fresh)
    run_and_check(x, qw, bias, geometry, True)


def test_prepared_weights_live_with_their_tensors(rng):
    gc.collect()  # earlier tests' weights, so that none of them goes during the counting
    before = ops._C.prepacked_conv2d_weights()[0]
    weights = [quantize_weight(torch.randn(16, 8, 3, 3, generator=rng), bits=4) for _ in range(3)]
    assert all(ops.prepack_conv2d(w, act_int8=True) > 0 for w in weights)
    assert ops._C.prepacked_conv2d_weights()[0] == before + 3
    del weights
    assert ops._C.prepacked_conv2d_weights()[0] == before
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3), torch.nn.Conv2d(16, 4, 3))
    quantkernels.swap_to_quantized(model, bits=8, activations="int8")  # loading the weight prepares it
    assert ops._C.prepacked_conv2d_weights()[0] == before + 2
    with torch.inference_mode():
        untracked = quantize_weight(torch.randn(16, 8, 3, 3, generator=rng), bits=8)
    assert ops.prepack_conv2d(untracked) == 0
    with pytest.raises(ValueError, match="4-D conv weight"):
        ops.prepack_conv2d(quantize_weight(torch.randn(16, 8, generator=rng), bits=8))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", ["3x3", "1x1", "depthwise", "3x1_groups2", "7x7_images", "1x1_stride2"])
def test_non_finite_image(isa, name, value, channels_last, rng):
    """Dynamic activations: an image holding NaN or Inf is NaN throughout (also where a strided conv does not read
    that pixel: (2, 3) at stride 2); the other images are unaffected."""
    case = list(CASES[name])
    case[0] = 2
    x, qw, bias, geometry = make_problem(tuple(case), 8, None, True, rng, channels_last=channels_last, bias=True)
    x[1, 0, 2, 3] = value
    out = quantkernels.conv2d(x, qw, bias, *geometry[1:], act_int8=True)
    assert out[1].isnan().all()
    want = reference.conv2d(8, x[:1].double(), qw.qdata, qw.scale, None, bias, *geometry, True)
    bound = conv2d_bound(8, x[:1], qw.qdata, qw.scale, None, bias, *geometry, True)
    assert_close_to_reference(out[:1], want, bound, x.dtype, True)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", [(2, 6, 37, (117, 123), (1, 1), (1, 1), (0, 0), (1, 1), 1),
                                  (60, 3, 363, (7, 7), (3, 3), (1, 1), (1, 1), (1, 1), 1)], ids=["1x1", "7x7_images"])
def test_streamed_output(isa, case, channels_last, rng):
    """Outputs of 4 MB and more are written around the caches: plane rows (NCHW) or pixel rows (NHWC, 37 or 363
    channels) that start anywhere in a cache line, in a tensor from torch's allocator."""
    x, qw, bias, geometry = make_problem(case, 8, None, True, rng, channels_last=channels_last, bias=True)
    batch, _, cout, (h, w) = case[:4]
    # Filled and freed at once, so that memory the allocator hands out again for the output holds NaN rather than
    # a previous run's answer.
    torch.full((batch * cout * h * w,), float("nan"))
    out = run_and_check(x, qw, bias, geometry, act_int8=True)
    assert out.numel() * 4 >= 4 << 20


@pytest.mark.parametrize("name", ["3x3", "1x1"])
def test_all_zero_image_gives_bias(isa, name, rng):
    x, qw, bias, geometry = make_problem(CASES[name], 8, None, True, rng, bias=True)
    out = quantkernels.conv2d(torch.zeros_like(x), qw, bias, *geometry[1:], act_int8=True)
    assert torch.equal(out, bias.view(1, -1, 1, 1).expand_as(out))


def test_zero_channels_is_an_error(rng):
    qw = quantize_weight(torch.randn(4, 1, 1, 1, generator=rng), bits=8)
    x = torch.randn(1, 0, 5, 5, generator=rng)
    args = (None, [1, 1], [1, 1], [0, 0], [1, 1], 1, False)
    with pytest.raises(ValueError, match="in_channels=0"):
        torch.ops.quant.conv2d_int8(x, qw.qdata, qw.scale, *args)
    with pytest.raises(ValueError, match="in_channels=0"):
        with torch._subclasses.FakeTensorMode():
            torch.ops.quant.conv2d_int8(torch.empty(1, 0, 5, 5), torch.empty(4, 1, dtype=torch.int8), torch.empty(4, 1),
                                        *args)


@st.composite
def conv_problems(draw):
    depthwise = draw(st.booleans())
    if depthwise:
        groups = cin = cout = draw(st.integers(1, 40))
    else:
        groups = draw(st.integers(1, 3))
        cin, cout = groups * draw(st.integers(1, 12)), groups * draw(st.integers(1, 12))
    kernel = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    # Smallest input with one output: dilation * (kernel - 1) + 1 <= size + 2 * padding.
    size = [draw(st.integers(max(1, dilation[i] * (kernel[i] - 1) + 1 - 2 * padding[i]), 20)) for i in range(2)]
    bits, symmetric = draw(st.sampled_from([(8, True), (4, True), (4, False)]))
    return dict(
        case=(draw(st.integers(1, 3)), cin, cout, tuple(size), kernel, stride, padding, dilation, groups),
        bits=bits,
        symmetric=symmetric,
        group_size=draw(st.sampled_from([None, 32, 64])),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        channels_last=draw(st.booleans()),
        act_int8=draw(st.booleans()),
        bias=draw(st.booleans()),
        isa=draw(st.sampled_from(quantkernels.supported_isas())),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=conv_problems())
def test_conv2d_property(p):
    rng = torch.Generator().manual_seed(p["seed"])
    x, qw, bias, geometry = make_problem(
        p["case"], p["bits"], p["group_size"], p["symmetric"], rng, p["dtype"], p["channels_last"], p["bias"]
    )
    before = quantkernels.active_isa()
    quantkernels.set_isa(p["isa"])
    try:
        run_and_check(x, qw, bias, geometry, p["act_int8"])
    finally:
        quantkernels.set_isa(before)
