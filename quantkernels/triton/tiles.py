"""Tile arithmetic shared by the linear and conv2d kernels: the contraction and the epilogue."""

import triton
import triton.language as tl


@triton.jit
def contract(x, q):
    """``x`` [BLOCK_M, BLOCK_K] times int8 ``q`` [BLOCK_N, BLOCK_K] transposed -> [BLOCK_M, BLOCK_N].

    int8 ``x`` (dynamic int8 activations) gives exact int32 sums, float ``x`` float32 sums. A single row is a
    GEMV: FMAs and a reduction, since a tensor-core tile has at least 16 rows. Otherwise ``tl.dot`` with ``q``
    converted to x's type (exact, |q| <= 127): float16/bfloat16 MMAs multiply exactly and accumulate in
    float32; float32 activations use three TF32 MMAs per product ("tf32x3": ``q`` is exact in TF32 and the
    split of ``x`` leaves a 2^-22 relative error), inside the float32 tolerance where one TF32 MMA (2^-11)
    is not.
    """
    # One return at the end: Triton types every return statement, even past a compile-time branch.
    if x.dtype == tl.int8:
        if x.shape[0] == 1:
            product = tl.sum(x.to(tl.int32) * q.to(tl.int32), axis=1)[None, :]
        else:
            product = tl.dot(x, tl.trans(q), out_dtype=tl.int32)
    elif x.shape[0] == 1:
        product = tl.sum(x.to(tl.float32) * q.to(tl.float32), axis=1)[None, :]
    elif x.dtype == tl.float32:
        product = tl.dot(x, tl.trans(q.to(tl.float32)), input_precision="tf32x3")
    elif x.dtype == tl.bfloat16:
        # Through float32, the conversions sm_80 emits anyway (it has no integer-to-bfloat16 cvt; sm_90 pays
        # one extra cvt): Triton 3.9's interpreter gets the direct cast wrong, and this way it runs the same.
        product = tl.dot(x, tl.trans(q.to(tl.float32).to(tl.bfloat16)))
    else:
        product = tl.dot(x, tl.trans(q.to(x.dtype)))
    return product


@triton.jit
def finish_tile(acc, x_scale_ptr, scale_rows, m_mask, bias_ptr, offs_n, n_mask):
    """Applies the per-row activation scale (int8 activations; None otherwise) and the float32 bias (or None)."""
    if x_scale_ptr is not None:
        acc = acc * tl.load(x_scale_ptr + scale_rows, mask=m_mask, other=0.0)[:, None]
    if bias_ptr is not None:
        acc = acc + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    return acc


@triton.jit
def tile_coords(pid, m, n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Output tile (row tile, column tile) of program ``pid``. Consecutive programs walk GROUP_M row tiles
    down one column of tiles before moving right, so the weight tiles they share are still in L2."""
    tiles_m = tl.cdiv(m, BLOCK_M)
    tiles_n = tl.cdiv(n, BLOCK_N)
    programs_per_band = GROUP_M * tiles_n
    band = pid // programs_per_band
    first_m = band * GROUP_M
    band_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % programs_per_band) % band_rows
    pid_n = (pid % programs_per_band) // band_rows
    return pid_m, pid_n
