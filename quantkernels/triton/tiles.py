"""Tile arithmetic shared by the linear and conv2d kernels: the contraction and the epilogue."""

import triton
import triton.language as tl


@triton.jit
def contract(x, q):
    """``x`` [BLOCK_M, BLOCK_K] times ``q`` [BLOCK_N, BLOCK_K] transposed -> [BLOCK_M, BLOCK_N].

    int8 operands (dynamic int8 activations) give exact int32 sums, float operands float32 sums. A single row
    is a GEMV: FMAs and a reduction, since a tensor-core tile has at least 16 rows. Otherwise ``tl.dot``:
    float16/bfloat16 MMAs multiply exactly and accumulate in float32; float32 activations use three TF32 MMAs
    per product ("tf32x3": the integer ``q`` is exact in TF32 and the split of ``x`` leaves a 2^-22 relative
    error), which stays inside the float32 tolerance where one TF32 MMA (2^-11) would not.
    """
    if x.dtype == tl.int8:
        if x.shape[0] == 1:
            return tl.sum(x.to(tl.int32) * q.to(tl.int32), axis=1)[None, :]
        return tl.dot(x, tl.trans(q), out_dtype=tl.int32)
    if x.shape[0] == 1:
        return tl.sum(x.to(tl.float32) * q.to(tl.float32), axis=1)[None, :]
    if x.dtype == tl.float32:
        return tl.dot(x, tl.trans(q), input_precision="tf32x3")
    return tl.dot(x, tl.trans(q))


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
