"""Dynamic int8 activations on the GPU: the same integers as ``formats.quantize_activation_per_token``."""

from __future__ import annotations

import triton
import triton.language as tl

from ..formats import ACT_INT8_QMAX
from .configs import ELEMENTWISE_BLOCK, ELEMENTWISE_WARPS
from .launch import Launch


@triton.jit
def round_half_even(v):
    """``torch.round`` for float32 |v| < 2^22 from exact steps (no libdevice, so it also runs interpreted):
    ``v - floor(v)`` is exact, and a tie rounds up only from an odd floor."""
    low = tl.floor(v)
    frac = v - low
    low_is_odd = tl.floor(low * 0.5) * 2.0 != low
    up = (frac > 0.5) | ((frac == 0.5) & low_is_odd)
    return low + up.to(tl.float32)


@triton.jit
def quantize_rows_kernel(x_ptr, xq_ptr, xs_ptr, row_len, stride_x_row, stride_x_col, stride_q_row,
                         QMAX: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row of ``row_len`` elements (a token, or a whole image for conv2d).

    ``xs[row] = absmax / QMAX`` (IEEE float32 division, as torch divides), ``xq = round_half_even(x / xs)``
    written as int8 with row stride ``stride_q_row``. A row holding NaN or Inf gets ``xs = NaN`` (a NaN output
    row) and zero codes; an all-zero row gets ``xs = 0`` and zero codes.
    """
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x_row
    absmax = tl.zeros((BLOCK,), tl.float32)
    nonfinite = tl.zeros((BLOCK,), tl.int32)
    for start in range(0, row_len, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        v = tl.abs(tl.load(x_row + offs * stride_x_col, mask=offs < row_len, other=0.0).to(tl.float32))
        finite = v < float("inf")  # false for NaN too
        absmax = tl.maximum(absmax, tl.where(finite, v, 0.0))
        nonfinite = tl.maximum(nonfinite, (~finite).to(tl.int32))
    scale = tl.div_rn(tl.max(absmax, axis=0), QMAX * 1.0)
    row_nonfinite = tl.max(nonfinite, axis=0) > 0
    usable = (scale > 0.0) & (~row_nonfinite)
    divisor = tl.where(usable, scale, 1.0)
    for start in range(0, row_len, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < row_len
        v = tl.load(x_row + offs * stride_x_col, mask=mask, other=0.0).to(tl.float32)
        q = tl.where(usable, round_half_even(tl.div_rn(v, divisor)), 0.0)
        tl.store(xq_ptr + row * stride_q_row + offs, q.to(tl.int8), mask=mask)
    tl.store(xs_ptr + row, tl.where(row_nonfinite, float("nan"), scale))


def quantize_rows(x, xq, xs, n_rows: int, row_len: int, stride_row: int, stride_col: int) -> Launch:
    """Plans int8 quantization of ``n_rows`` rows of ``x`` into ``xq`` (rows ``xq.stride(0)`` apart, unit
    column stride) and their scales into float32 ``xs``."""
    return Launch(
        quantize_rows_kernel,
        (n_rows,),
        dict(x_ptr=x, xq_ptr=xq, xs_ptr=xs, row_len=row_len, stride_x_row=stride_row, stride_x_col=stride_col,
             stride_q_row=xq.stride(0), QMAX=ACT_INT8_QMAX, BLOCK=ELEMENTWISE_BLOCK),
        num_warps=ELEMENTWISE_WARPS,
    )
