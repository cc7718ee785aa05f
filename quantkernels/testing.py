"""Tolerances for comparing a kernel with the float64 reference, kept in one place.

A kernel's error is bounded by ``ACCUM_RTOL * bound + OUTPUT_EPS[dtype] * |reference| + OUTPUT_TINY[dtype]``,
where ``bound`` is ``|x| @ |W|^T + |bias|``: the sum any summation order's rounding error scales with.
``ACCUM_RTOL`` covers float32 accumulation; ``OUTPUT_EPS`` and ``OUTPUT_TINY`` the final rounding to the
activation's dtype, relative for normal results and absolute for subnormal ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference

ACCUM_RTOL = {False: 1e-5, True: 2e-5}  # weight-only / dynamic int8 activations
OUTPUT_EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}
# Near zero the final rounding is absolute: half the smallest subnormal step of the dtype (float16's 2^-24 is
# large enough to matter: a result of 5e-6 may be off by 3e-8, far more than OUTPUT_EPS * 5e-6).
OUTPUT_TINY = {torch.float32: 2.0**-150, torch.bfloat16: 2.0**-134, torch.float16: 2.0**-25}
# Triton 3.9's interpreter casts float32 to bfloat16 by truncation (a GPU rounds to nearest): up to one ulp
# (2^-7) of output error instead of half of one, so interpreted bfloat16 outputs get twice the tolerance.
INTERPRETER_BFLOAT16_SCALE = 2.0


def linear_bound(bits, x, qweight, scale, zero_point=None, bias=None, act_int8=False) -> torch.Tensor:
    w = reference.dequantize_packed(bits, qweight, scale, zero_point, x.shape[-1]).abs()
    xd = reference.quantize_rows_int8(x, x.dim() - 1) if act_int8 else x.double()
    b = bias.double().abs() if bias is not None else 0.0
    return xd.abs() @ w.T + b


def conv2d_bound(bits, x, qweight, scale, zero_point, bias, kernel_size, stride, padding, dilation, groups, act_int8):
    k = x.shape[1] // groups * kernel_size[0] * kernel_size[1]
    w = reference.dequantize_packed(bits, qweight, scale, zero_point, k).abs()
    w = w.reshape(qweight.shape[0], x.shape[1] // groups, *kernel_size)
    xd = reference.quantize_rows_int8(x, 1) if act_int8 else x.double()
    b = bias.double().abs() if bias is not None else None
    return F.conv2d(xd.abs(), w, b, stride, padding, dilation, groups)


def assert_close_to_reference(out, want64, bound, dtype, act_int8=False, scale=1.0):
    """``scale`` widens the tolerance for kernels whose error model is looser (a named multiple, not a fudge)."""
    assert out.shape == want64.shape, f"shape {tuple(out.shape)} != reference {tuple(want64.shape)}"
    assert out.dtype == dtype, f"dtype {out.dtype} != {dtype}"
    err = (out.double() - want64).abs()
    tol = scale * (ACCUM_RTOL[act_int8] * bound + OUTPUT_EPS[dtype] * want64.abs() + OUTPUT_TINY[dtype]) + 1e-30
    bad = ~(err <= tol)
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{int(bad.sum())} of {bad.numel()} elements off; first at {i}: got {out[tuple(i)].item()}, "
            f"want {want64[tuple(i)].item()}, tolerance {tol[tuple(i)].item():.3g}, max err/tol "
            f"{(err / tol).max().item():.3g}"
        )
