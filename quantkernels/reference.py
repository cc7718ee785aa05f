"""Pure-torch reference implementations of every ``quant::`` op: the oracle each fast kernel is tested against.

Computed in float64 from the dequantized weight, then cast to the activation's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .formats import ACT_INT8_QMAX, INT4_SYMMETRIC_ZERO, unpack_int4


def dequantize_packed(bits, qweight, scale, zero_point, k) -> torch.Tensor:
    """Float64 ``(N, k)`` weight from the stored tensors (the spec in formats.py)."""
    codes = unpack_int4(qweight) if bits == 4 else qweight.to(torch.int16)
    group_len = codes.shape[1] // scale.shape[1]
    if bits == 8:
        zeros = torch.zeros_like(scale, dtype=torch.float64)
    elif zero_point is None:
        zeros = torch.full_like(scale, INT4_SYMMETRIC_ZERO, dtype=torch.float64)
    else:
        zeros = zero_point.to(torch.float64)
    w = (codes.to(torch.float64) - zeros.repeat_interleave(group_len, 1)) * scale.to(torch.float64).repeat_interleave(
        group_len, 1
    )
    return w[:, :k]


def quantize_rows_int8(x: torch.Tensor, dim_start: int) -> torch.Tensor:
    """Dynamic symmetric int8 quantization with one scale per slice ``x[i0, ..., i_{dim_start-1}]``.

    Returns ``xq * scale`` in float64: the activation the integer kernels actually multiply. A slice whose
    absmax is not finite (NaN or Inf present) becomes NaN, as in the kernels.
    """
    xf = x.to(torch.float32)
    flat = xf.flatten(dim_start)
    scale = flat.abs().amax(dim=-1) / ACT_INT8_QMAX
    scale = torch.where(flat.isnan().any(dim=-1), torch.nan, scale)
    scale = scale.reshape(scale.shape + (1,) * (x.dim() - dim_start))
    usable = torch.isfinite(scale) & (scale > 0)
    xq = torch.where(usable, torch.round(xf / torch.where(usable, scale, 1.0)), 0.0)
    return torch.where(torch.isfinite(scale), xq.double() * scale.double(), torch.nan)


def linear(bits, x, qweight, scale, zero_point=None, bias=None, act_int8=False) -> torch.Tensor:
    w = dequantize_packed(bits, qweight, scale, zero_point, x.shape[-1])
    xd = quantize_rows_int8(x, x.dim() - 1) if act_int8 else x.double()
    y = xd @ w.T
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)


def conv2d(bits, x, qweight, scale, zero_point, bias, kernel_size, stride, padding, dilation, groups, quantize_input):
    cout = qweight.shape[0]
    k = x.shape[1] // groups * math.prod(kernel_size)
    w = dequantize_packed(bits, qweight, scale, zero_point, k).reshape(cout, x.shape[1] // groups, *kernel_size)
    xd = quantize_rows_int8(x, 1) if quantize_input else x.double()
    b = bias.double() if bias is not None else None
    y = F.conv2d(xd, w, b, stride, padding, dilation, groups)
    memory_format = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
    return y.to(x.dtype).contiguous(memory_format=memory_format)


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
