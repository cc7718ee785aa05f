"""Dynamic int8 activations on the GPU: the same integers as ``formats.quantize_activation_per_token``.

A row (a token, or a whole image for conv2d) is cut into chunks of ``CHUNK`` elements so that a long row is
spread over many programs: one launch writes each chunk's absmax, a second one reduces a row's chunk maxima to
its scale and quantizes the chunk. An image of 800 K elements in one program took 640 us on an H100 for a
batch of 8 (eight programs, two serial passes each). Max is exact in any order, so the result does not depend
on the chunking.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..formats import ACT_INT8_QMAX
from .configs import ELEMENTWISE_BLOCK, ELEMENTWISE_WARPS, QUANTIZE_CHUNK
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
def chunk_absmax_kernel(x_ptr, partial_ptr, row_len, chunks, stride_x_row, stride_x_col,
                        CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """``partial[row, chunk]``: the largest |x| of the chunk, or +Inf where it holds a NaN or an Inf (so a
    row's maximum is Inf exactly when the row is not finite). Grid: (rows, chunks)."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    absmax = tl.zeros((BLOCK,), tl.float32)
    for start in range(chunk * CHUNK, tl.minimum(row_len, (chunk + 1) * CHUNK), BLOCK):
        offs = start + tl.arange(0, BLOCK)
        v = tl.abs(tl.load(x_ptr + row * stride_x_row + offs * stride_x_col, mask=offs < row_len, other=0.0)
                   .to(tl.float32))
        absmax = tl.maximum(absmax, tl.where(v < float("inf"), v, float("inf")))  # NaN < inf is false
    tl.store(partial_ptr + row * chunks + chunk, tl.max(absmax, axis=0))


@triton.jit
def quantize_chunk_kernel(x_ptr, partial_ptr, xq_ptr, xs_ptr, row_len, chunks, stride_x_row, stride_x_col,
                          stride_q_row, QMAX: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Quantizes chunk ``program_id(1)`` of row ``program_id(0)`` with the row's scale
    ``xs[row] = absmax / QMAX`` (IEEE float32 division, as torch divides): ``xq = round_half_even(x / xs)``
    as int8, rows ``stride_q_row`` apart. A row holding NaN or Inf gets ``xs = NaN`` (a NaN output row) and
    zero codes; an all-zero row gets ``xs = 0`` and zero codes. Chunk 0 stores ``xs``."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    row_max = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, chunks, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        row_max = tl.maximum(row_max, tl.load(partial_ptr + row * chunks + offs, mask=offs < chunks, other=0.0))
    absmax = tl.max(row_max, axis=0)
    finite = absmax < float("inf")
    scale = tl.div_rn(absmax, QMAX * 1.0)
    usable = (scale > 0.0) & finite
    divisor = tl.where(usable, scale, 1.0)
    for start in range(chunk * CHUNK, tl.minimum(row_len, (chunk + 1) * CHUNK), BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < row_len
        v = tl.load(x_ptr + row * stride_x_row + offs * stride_x_col, mask=mask, other=0.0).to(tl.float32)
        q = tl.where(usable, round_half_even(tl.div_rn(v, divisor)), 0.0)
        tl.store(xq_ptr + row * stride_q_row + offs, q.to(tl.int8), mask=mask)
    if chunk == 0:
        tl.store(xs_ptr + row, tl.where(finite, scale, float("nan")))


def quantize_rows(x, xq, xs, n_rows: int, row_len: int, stride_row: int, stride_col: int) -> list:
    """Plans int8 quantization of ``n_rows`` rows of ``x`` into ``xq`` (rows ``xq.stride(0)`` apart, unit
    column stride) and their scales into float32 ``xs``: two launches, to run in order."""
    chunks = triton.cdiv(row_len, QUANTIZE_CHUNK)
    partial = xs.new_empty(n_rows, chunks)
    common = dict(x_ptr=x, partial_ptr=partial, row_len=row_len, chunks=chunks, stride_x_row=stride_row,
                  stride_x_col=stride_col, CHUNK=QUANTIZE_CHUNK, BLOCK=ELEMENTWISE_BLOCK)
    return [
        Launch(chunk_absmax_kernel, (n_rows, chunks), common, num_warps=ELEMENTWISE_WARPS),
        Launch(quantize_chunk_kernel, (n_rows, chunks),
               dict(common, xq_ptr=xq, xs_ptr=xs, stride_q_row=xq.stride(0), QMAX=ACT_INT8_QMAX),
               num_warps=ELEMENTWISE_WARPS),
    ]
