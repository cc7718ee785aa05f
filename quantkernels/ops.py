"""The ``quant::`` ops: schemas live in ``csrc/torch/ops.cpp`` (loaded with ``quantkernels._C``); here are the
argument checks shared by the fake kernels and the Triton backend, the fakes that let ``torch.compile`` and
``torch.export`` trace the ops, and typed wrappers that take a :class:`~quantkernels.formats.QuantizedWeight`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from . import _C  # noqa: F401  (registers the schemas and the CPU kernels)
from .formats import ACTIVATION_DTYPES, GROUP_SIZES, QuantizedWeight, padded_k

LINEAR_OPS = ("linear_int8", "linear_int4", "linear_w8a8", "linear_w4a8")
CONV_OPS = ("conv2d_int8", "conv2d_int4")
ALL_OPS = LINEAR_OPS + CONV_OPS


def check_activation(x: torch.Tensor) -> None:
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"x: got dtype {x.dtype}, expected float32, bfloat16 or float16")
    if x.dim() < 1:
        raise ValueError("x: got a 0-d tensor, expected shape (..., in_features)")


def check_weight(bits, k, qweight, scale, zero_point, device) -> int:
    """Checks the stored tensors against an activation with ``k`` columns; returns the group length.

    Mirrors ``check_weight`` in csrc/torch/ops.cpp, message for message.
    """
    want_q = torch.int8 if bits == 8 else torch.uint8
    if qweight.dtype != want_q:
        raise TypeError(f"qweight: got dtype {qweight.dtype}, expected {want_q} for int{bits} weights")
    if qweight.dim() != 2 or qweight.shape[0] == 0 or qweight.shape[1] == 0:
        raise ValueError(
            f"qweight: got shape {tuple(qweight.shape)}, expected a non-empty 2-D (out_features, packed in_features) tensor"
        )
    if scale.dtype != torch.float32:
        raise TypeError(f"scale: got dtype {scale.dtype}, expected float32")
    n = qweight.shape[0]
    k_pad = qweight.shape[1] * (1 if bits == 8 else 2)
    if scale.dim() != 2 or scale.shape[0] != n or scale.shape[1] == 0 or k_pad % scale.shape[1] != 0:
        raise ValueError(
            f"scale: got shape {tuple(scale.shape)}, expected ({n}, n_groups) with n_groups dividing the "
            f"{k_pad} stored columns of qweight"
        )
    group_len = k_pad // scale.shape[1]
    per_channel = scale.shape[1] == 1 and k_pad == padded_k(bits, k, None)
    grouped = group_len in GROUP_SIZES and k_pad == padded_k(bits, k, group_len)
    if not (per_channel or grouped):
        raise ValueError(
            f"qweight: got {k_pad} stored columns in {scale.shape[1]} groups for an activation with in_features={k}, "
            f"expected in_features padded to a multiple of the group size (one of {GROUP_SIZES}) or one group per "
            f"row ({padded_k(bits, k, None)} columns)"
        )
    if zero_point is not None:
        if bits != 4:
            raise ValueError("zero_point: got a tensor for int8 weights, expected None (int8 is symmetric)")
        if zero_point.dtype != torch.uint8:
            raise TypeError(f"zero_point: got dtype {zero_point.dtype}, expected torch.uint8")
        if zero_point.shape != scale.shape:
            raise ValueError(
                f"zero_point: got shape {tuple(zero_point.shape)}, expected the shape of scale {tuple(scale.shape)}"
            )
    for name, t in (("qweight", qweight), ("scale", scale), ("zero_point", zero_point)):
        if t is not None and t.device != device:
            raise ValueError(f"{name}: got device {t.device}, expected {device} like x")
    return group_len


def check_bias(bias, n, device) -> None:
    if bias is None:
        return
    if not bias.dtype.is_floating_point:
        raise TypeError(f"bias: got dtype {bias.dtype}, expected a floating dtype")
    if bias.dim() != 1 or bias.shape[0] != n:
        raise ValueError(f"bias: got shape {tuple(bias.shape)}, expected ({n},)")
    if bias.device != device:
        raise ValueError(f"bias: got device {bias.device}, expected {device} like x")


def check_linear(bits, x, qweight, scale, zero_point, bias) -> int:
    check_activation(x)
    if x.shape[-1] == 0:  # before check_weight, which divides by in_features
        raise ValueError("x: got in_features=0, expected at least 1")
    group_len = check_weight(bits, x.shape[-1], qweight, scale, zero_point, x.device)
    check_bias(bias, qweight.shape[0], x.device)
    return group_len


def conv2d_output_size(x_shape, kernel_size, stride, padding, dilation):
    return tuple(
        (x_shape[2 + i] + 2 * padding[i] - dilation[i] * (kernel_size[i] - 1) - 1) // stride[i] + 1 for i in range(2)
    )


def check_conv2d(bits, x, qweight, scale, zero_point, bias, kernel_size, stride, padding, dilation, groups):
    check_activation(x)
    if x.dim() != 4:
        raise ValueError(f"x: got shape {tuple(x.shape)}, expected (batch, channels, height, width)")
    if x.shape[1] == 0:
        raise ValueError("x: got in_channels=0, expected at least 1")
    for name, value, lowest in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0),
                                ("dilation", dilation, 1)):
        if len(value) != 2 or min(value) < lowest:
            kind = "positive" if lowest else "non-negative"
            raise ValueError(f"{name}: got {list(value)}, expected two {kind} ints")
    c, cout = x.shape[1], qweight.shape[0] if qweight.dim() > 0 else 0
    if groups <= 0 or c % groups or cout % groups:
        raise ValueError(
            f"groups: got {groups}, expected a positive divisor of in_channels={c} and out_channels={cout}"
        )
    k = c // groups * math.prod(kernel_size)
    check_weight(bits, k, qweight, scale, zero_point, x.device)
    check_bias(bias, cout, x.device)
    oh, ow = conv2d_output_size(x.shape, kernel_size, stride, padding, dilation)
    if oh <= 0 or ow <= 0:
        raise ValueError(
            f"x: got spatial size {x.shape[2]}x{x.shape[3]}, too small for kernel_size {list(kernel_size)} with "
            f"padding {list(padding)} and dilation {list(dilation)}"
        )
    return oh, ow


def _linear_out(x, qweight):
    return x.new_empty(x.shape[:-1] + (qweight.shape[0],))


def _conv_out(x, qweight, kernel_size, stride, padding, dilation):
    oh, ow = conv2d_output_size(x.shape, kernel_size, stride, padding, dilation)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    # Allocated in its layout: .contiguous(memory_format=...) of an NCHW tensor would copy it (a transposing
    # copy of the whole output: most of a channels_last 1x1 conv's time on an H100).
    return torch.empty((x.shape[0], qweight.shape[0], oh, ow), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@torch.library.register_fake("quant::linear_int8")
def _(x, qweight, scale, bias=None):
    check_linear(8, x, qweight, scale, None, bias)
    return _linear_out(x, qweight)


@torch.library.register_fake("quant::linear_w8a8")
def _(x, qweight, scale, bias=None):
    check_linear(8, x, qweight, scale, None, bias)
    return _linear_out(x, qweight)


@torch.library.register_fake("quant::linear_int4")
def _(x, qweight, scale, zero_point=None, bias=None):
    check_linear(4, x, qweight, scale, zero_point, bias)
    return _linear_out(x, qweight)


@torch.library.register_fake("quant::linear_w4a8")
def _(x, qweight, scale, zero_point=None, bias=None):
    check_linear(4, x, qweight, scale, zero_point, bias)
    return _linear_out(x, qweight)


@torch.library.register_fake("quant::conv2d_int8")
def _(x, qweight, scale, bias, kernel_size, stride, padding, dilation, groups, quantize_input):
    check_conv2d(8, x, qweight, scale, None, bias, kernel_size, stride, padding, dilation, groups)
    return _conv_out(x, qweight, kernel_size, stride, padding, dilation)


@torch.library.register_fake("quant::conv2d_int4")
def _(x, qweight, scale, zero_point, bias, kernel_size, stride, padding, dilation, groups, quantize_input):
    check_conv2d(4, x, qweight, scale, zero_point, bias, kernel_size, stride, padding, dilation, groups)
    return _conv_out(x, qweight, kernel_size, stride, padding, dilation)


def linear(x: torch.Tensor, weight: QuantizedWeight, bias: Optional[torch.Tensor] = None, act_int8: bool = False):
    """``x @ W.T + bias`` with a quantized ``W``; ``act_int8`` quantizes ``x`` per token to int8 first."""
    if weight.bits == 8:
        op = torch.ops.quant.linear_w8a8 if act_int8 else torch.ops.quant.linear_int8
        return op(x, weight.qdata, weight.scale, bias)
    op = torch.ops.quant.linear_w4a8 if act_int8 else torch.ops.quant.linear_int4
    return op(x, weight.qdata, weight.scale, weight.zero_point, bias)


def _pair(value, name: str) -> list:
    """An int or a pair of ints, as F.conv2d takes them, as the ops' two-int list."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value, value]
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return list(value)
    raise TypeError(f"{name}: got {value!r}, expected an int or a pair of ints")


def conv2d(
    x: torch.Tensor,
    weight: QuantizedWeight,
    bias: Optional[torch.Tensor] = None,
    stride: Union[int, Sequence[int]] = 1,
    padding: Union[int, Sequence[int]] = 0,
    dilation: Union[int, Sequence[int]] = 1,
    groups: int = 1,
    act_int8: bool = False,
):
    """``F.conv2d`` with a quantized 4-D weight; ``act_int8`` quantizes each image of ``x`` to int8 first.
    ``stride``, ``padding`` and ``dilation`` are ints or pairs, as for ``F.conv2d`` (the module,
    ``QuantizedConv2d``, also takes ``padding='same'``)."""
    geometry = (list(weight.shape[2:]), _pair(stride, "stride"), _pair(padding, "padding"),
                _pair(dilation, "dilation"), groups, act_int8)
    if weight.bits == 8:
        return torch.ops.quant.conv2d_int8(x, weight.qdata, weight.scale, bias, *geometry)
    return torch.ops.quant.conv2d_int4(x, weight.qdata, weight.scale, weight.zero_point, bias, *geometry)


def prepack_conv2d(
    weight: QuantizedWeight,
    stride: Union[int, Sequence[int]] = 1,
    padding: Union[int, Sequence[int]] = 0,
    groups: int = 1,
    act_int8: bool = False,
    channels_last: bool = False,
) -> int:
    """Lays a 4-D weight out now for the CPU conv kernels of the active instruction set, as the first
    :func:`conv2d` call with these arguments (and inputs in channels_last or not) would: K reordered for the
    im2col rows and, with ``act_int8`` on an AMX CPU, the int8 weight in tiles. Held beside the stored weight
    (never saved) while the weight's tensors live and are not written; a write, another instruction set or other
    arguments make the next call prepare it (again). :class:`QuantizedConv2d` calls this when it loads its
    weight. Returns the bytes held: 0 for a CUDA weight or inference tensors (prepared per call), and where the
    stored layout serves as it is."""
    if weight.qdata.dim() != 2 or len(weight.shape) != 4:
        raise ValueError(f"weight: got shape {tuple(weight.shape)}, expected a 4-D conv weight")
    return _C.prepack_conv2d(weight.qdata, weight.scale, weight.zero_point, weight.shape[1] * groups,
                             list(weight.shape[2:]), _pair(stride, "stride"), _pair(padding, "padding"), groups,
                             act_int8, channels_last)


def active_isa() -> str:
    """The instruction set the CPU kernels use now ('portable', 'avx2', 'avx512' or 'amx')."""
    return _C.active_isa()


def supported_isas() -> list:
    return list(_C.supported_isas())


def set_isa(name: str) -> None:
    """Forces the CPU kernels onto one instruction set; ``QUANTKERNELS_ISA`` does the same at start-up."""
    _C.set_isa(name)
