"""CPU conv2d: quantkernels.conv2d beside float F.conv2d and torch.ao's quantized Conv2d (issue 6).

One group per (layer, batch). Our weights are int8 or int4 per output channel (symmetric); ``a8`` variants
quantize each image to int8 at run time (``act_int8=True``). torch.ao's Conv2d is timed the way a statically
quantized model runs it: quantize the float input with calibrated parameters, convolve, dequantize the output.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F

import quantkernels
from quantkernels import reference
from quantkernels.formats import QuantizedWeight, quantize_weight

from .conftest import Target, clone_tensors, target_marks
from .shapes import CONV_BATCHES, CONV_SHAPES, ConvShape
from .test_linear import BF16_REL_TOL, FP32_REL_TOL, tensor_bytes

# torch.ao's conv quantizes its input per tensor to uint8 and its output likewise (both with the full 0..255
# range calibrated on the data): each adds about range/255/sqrt(12) RMS error, ~1 % of the RMS for normal
# data, so 5 % passes it and still fails a layout mistake.
AO_REL_TOL = 0.05


@dataclasses.dataclass(frozen=True)
class ConvImpl:
    """One way to run a conv layer: how to build its weight from a float32 one and how to call it."""

    name: str
    weights: str  # implementations with the same weights share their rotated copies
    ours: bool
    act_dtype: torch.dtype
    channels_last: bool
    make: Callable[[torch.Tensor, ConvShape, torch.Tensor], Any]  # (W, layer, sample input) -> weight state
    run: Callable[[torch.Tensor, Any, ConvShape], torch.Tensor]  # (x, weight state, layer) -> y
    weight_bytes: Callable[[Any], int]
    encoded: Callable[[torch.Tensor, Any], torch.Tensor]  # (W, weight state) -> the float64 W it convolves with
    rel_tol: float
    copy: Callable[[Any, ConvShape], Any] = lambda state, shape: clone_tensors(state)  # another weight state
    act_int8: bool = False


def conv_args(shape: ConvShape) -> dict:
    return dict(stride=(shape.stride,) * 2, padding=(shape.padding,) * 2, groups=shape.groups)


@functools.lru_cache(maxsize=2)
def quantized(w: torch.Tensor, bits: int) -> QuantizedWeight:
    return quantize_weight(w, bits=bits, group_size=None, symmetric=True)


def prepacked(qw: QuantizedWeight, shape: ConvShape, act_int8: bool, channels_last: bool) -> QuantizedWeight:
    """Our weight as a model holds it: laid out for the kernels when loaded (what QuantizedConv2d does), as
    torch.ao's module prepacks its weight when built."""
    quantkernels.ops.prepack_conv2d(qw, shape.stride, shape.padding, shape.groups, act_int8, channels_last)
    return qw


def ours(name, bits, act_int8, channels_last=False) -> ConvImpl:
    return ConvImpl(
        name=name,
        weights=name,  # copies prepared for this one way of running
        ours=True,
        act_dtype=torch.float32,
        channels_last=channels_last,
        make=lambda w, shape, x: prepacked(quantized(w, bits), shape, act_int8, channels_last),
        run=lambda x, qw, shape: quantkernels.conv2d(x, qw, act_int8=act_int8, **conv_args(shape)),
        weight_bytes=QuantizedWeight.nbytes,
        encoded=lambda w, qw: qw.dequantize(torch.float64),
        rel_tol=FP32_REL_TOL,
        copy=lambda qw, shape: prepacked(clone_tensors(qw), shape, act_int8, channels_last),
        act_int8=act_int8,
    )


def float_conv(dtype, channels_last) -> ConvImpl:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    name = f"{'fp32' if dtype == torch.float32 else 'bf16'} {'channels_last' if channels_last else 'NCHW'}"
    return ConvImpl(
        name=name,
        weights=name,
        ours=False,
        act_dtype=dtype,
        channels_last=channels_last,
        make=lambda w, shape, x: w.to(dtype).contiguous(memory_format=memory_format),
        run=lambda x, w, shape: F.conv2d(x, w, None, **conv_args(shape)),
        weight_bytes=tensor_bytes,
        encoded=lambda w, state: state.double(),
        rel_tol=FP32_REL_TOL if dtype == torch.float32 else BF16_REL_TOL,
        copy=lambda w, shape: w.clone(memory_format=memory_format),
    )


def uint8_qparams(t: torch.Tensor):
    """Per-tensor affine uint8 parameters covering t's range (and 0), as torch.ao's MinMaxObserver sets them."""
    lo, hi = min(t.min().item(), 0.0), max(t.max().item(), 0.0)
    scale = max((hi - lo) / 255, 1e-8)
    return scale, int(round(-lo / scale))


@dataclasses.dataclass
class AoConv:
    module: Any  # torch.ao.nn.quantized.Conv2d with its prepacked weight
    input_scale: float
    input_zero_point: int


def ao_conv(w: torch.Tensor, shape: ConvShape, x: torch.Tensor) -> AoConv:
    """A torch.ao quantized Conv2d on the x86 engine: per-channel int8 weight, calibrated on ``x``."""
    from torch.ao.nn.quantized import Conv2d

    torch.backends.quantized.engine = "x86"
    abs_max = w.flatten(1).abs().amax(dim=1).clamp(min=1e-8)
    qweight = torch.quantize_per_channel(w, abs_max / 127, torch.zeros_like(abs_max, dtype=torch.long), 0, torch.qint8)
    module = Conv2d(shape.in_channels, shape.out_channels, shape.kernel, **conv_args(shape), bias=False)
    module.set_weight_bias(qweight, None)
    module.scale, module.zero_point = uint8_qparams(F.conv2d(x, w, None, **conv_args(shape)))
    return AoConv(module, *uint8_qparams(x))


def ao_copy(conv: AoConv, shape: ConvShape) -> AoConv:
    module = conv.module
    new = type(module)(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                       module.padding, groups=module.groups, bias=False)
    new.set_weight_bias(module.weight(), None)
    new.scale, new.zero_point = module.scale, module.zero_point
    return dataclasses.replace(conv, module=new)


def ao_run(x: torch.Tensor, conv: AoConv, shape: ConvShape) -> torch.Tensor:
    qx = torch.quantize_per_tensor(x, conv.input_scale, conv.input_zero_point, torch.quint8)
    return conv.module(qx).dequantize()


def ao_impl(channels_last) -> ConvImpl:
    return ConvImpl(
        name=f"torch.ao int8 x86 {'channels_last' if channels_last else 'NCHW'}",
        weights="torch.ao int8 x86",
        ours=False,
        act_dtype=torch.float32,
        channels_last=channels_last,
        make=ao_conv,
        run=ao_run,
        weight_bytes=lambda conv: tensor_bytes(conv.module.weight()),
        encoded=lambda w, conv: conv.module.weight().dequantize().double(),
        rel_tol=AO_REL_TOL,
        copy=ao_copy,
    )


CONV_IMPLS = (
    ours("ours int8", 8, act_int8=False),
    ours("ours int8 a8", 8, act_int8=True),
    ours("ours int8 a8 channels_last", 8, act_int8=True, channels_last=True),
    ours("ours int4", 4, act_int8=False),
    ours("ours int4 a8", 4, act_int8=True),
    float_conv(torch.float32, channels_last=False),
    float_conv(torch.float32, channels_last=True),
    float_conv(torch.bfloat16, channels_last=True),
    ao_impl(channels_last=False),
    ao_impl(channels_last=True),
)


def conv_targets(impl: ConvImpl, shape: ConvShape, batch: int):
    """Issue 6: int8 (with int8 activations) >= 3x fp32 NCHW and >= torch.ao on 3x3 and 1x1 convs at batch 8;
    depthwise int8 no slower than fp32 NCHW."""
    if shape.groups > 1:
        if impl.name in ("ours int8", "ours int8 a8"):
            return (Target("fp32 NCHW", min_speedup=1.0, issue=6),)
        return ()
    if impl.name == "ours int8 a8" and batch == 8:
        return (Target("fp32 NCHW", min_speedup=3.0, issue=6),
                Target("torch.ao int8 x86 NCHW", min_speedup=1.0, issue=6))
    return ()


@functools.lru_cache(maxsize=1)
def float_weight(shape: ConvShape) -> torch.Tensor:
    fan_in = shape.in_channels // shape.groups * shape.kernel**2
    g = torch.Generator().manual_seed(0)  # the values do not matter to the speed; fixed for repeatability
    return torch.randn(shape.out_channels, shape.in_channels // shape.groups, shape.kernel, shape.kernel,
                       generator=g) / fan_in**0.5


def make_input(shape: ConvShape, batch: int, impl: ConvImpl) -> torch.Tensor:
    x = torch.randn(batch, shape.in_channels, shape.size, shape.size).to(impl.act_dtype)
    return x.contiguous(memory_format=torch.channels_last) if impl.channels_last else x


def layer_kind(shape: ConvShape) -> str:
    return "depthwise" if shape.groups > 1 else f"{shape.kernel}x{shape.kernel}"


# Ordered layer, then implementation, then batch: consecutive cases share one weight and its rotated copies
# (implementations with the same weights are listed side by side for the same reason).
CASES = [
    pytest.param(shape, impl, batch, id=f"{shape.id().replace(' ', '_')}-{impl.name.replace(' ', '_')}-b{batch}",
                 marks=target_marks({i.name: conv_targets(i, shape, batch) for i in CONV_IMPLS}, impl.name))
    for shape in CONV_SHAPES
    for impl in CONV_IMPLS
    for batch in CONV_BATCHES
]


@pytest.mark.parametrize("shape,impl,batch", CASES)
def test_conv2d(bench, shape, impl, batch):
    w = float_weight(shape)
    x = make_input(shape, batch, impl)
    bench(
        group=f"conv2d {shape.id()} batch={batch}",
        impl=impl.name,
        ours=impl.ours,
        make=lambda: impl.make(w, shape, x.float()),
        copy=lambda state: impl.copy(state, shape),
        call=lambda state: impl.run(x, state, shape),
        weight_bytes=impl.weight_bytes,
        flops=shape.flops(batch),
        key=(impl.weights, shape),
        targets=conv_targets(impl, shape, batch),
        kind="conv2d",
        shape=shape.id(),
        layer=layer_kind(shape),
        batch=batch,
    )


CHECK_SHAPES = (ConvShape("check", 16, 24, 9, 3), ConvShape("check depthwise", 16, 16, 9, 3, groups=16),
                ConvShape("check strided 1x1", 16, 8, 9, 1, stride=2))


@pytest.mark.parametrize("shape", CHECK_SHAPES, ids=lambda s: s.name.replace(" ", "_"))
@pytest.mark.parametrize("impl", CONV_IMPLS, ids=lambda impl: impl.name.replace(" ", "_"))
def test_impl_matches_reference(impl, shape):
    w = torch.randn(shape.out_channels, shape.in_channels // shape.groups, shape.kernel, shape.kernel)
    x = make_input(shape, 2, impl)
    state = impl.make(w, shape, x.float())
    out = impl.run(x, state, shape)
    x_used = reference.quantize_rows_int8(x, 1) if impl.act_int8 else x.double()
    want = F.conv2d(x_used, impl.encoded(w, state), None, **conv_args(shape))
    assert out.shape == want.shape and out.dtype == impl.act_dtype
    rel = ((out.double() - want).norm() / want.norm()).item()
    assert rel <= impl.rel_tol, f"{impl.name}: relative error {rel:.3g} > {impl.rel_tol:.3g}"
