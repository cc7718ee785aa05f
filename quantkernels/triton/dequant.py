"""The one helper that reads stored weights (docs/FORMATS.md) in every Triton kernel."""

import triton
import triton.language as tl

INT4_SYMMETRIC_ZERO: tl.constexpr = tl.constexpr(8)  # formats.INT4_SYMMETRIC_ZERO: the implicit zero point


@triton.jit
def load_weight_tile(w_ptr, scale_ptr, zero_ptr, offs_n, k0, n, k, stride_wn, n_groups, group_len,
                     BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Weight rows ``offs_n`` [BLOCK_N], columns ``k0 .. k0 + BLOCK_K`` (k0 a multiple of BLOCK_K).

    Returns ``(q, scale)``: ``q`` [BLOCK_N, BLOCK_K] int8 holds ``code - zero_point`` (at most 127 in
    magnitude, so exact in every operand type ``tiles.contract`` converts it to) and ``scale`` [BLOCK_N]
    float32 is the scale of the group holding the tile; ``W[n, k0 + j] = q[n, j] * scale[n]``. The caller keeps the tile
    inside one group (BLOCK_K divides group_len, or the weight is one group per row) and contracts ``q``
    before scaling, so dequantization adds no rounding: ``sum_k x*W = scale * sum_k x*(code - zero)``.

    int8: ``w_ptr`` int8 [n][k_pad]. int4: ``w_ptr`` uint8 [n][k_pad / 2], byte j holding element 2j in its
    low nibble and 2j + 1 in its high nibble, with ``zero_ptr`` uint8 [n][n_groups] or None (symmetric: 8).
    Rows >= n and columns >= k read as zero codes (callers mask the activation there too).
    """
    n_mask = offs_n < n
    group = k0 // group_len
    scale = tl.load(scale_ptr + offs_n * n_groups + group, mask=n_mask, other=0.0)
    if BITS == 8:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        q = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :],
                    mask=n_mask[:, None] & (offs_k[None, :] < k), other=0)
    else:
        # One byte per pair of columns: unpack both nibbles and interleave them back into column order.
        offs_byte = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_byte[None, :],
                         mask=n_mask[:, None] & (offs_byte[None, :] < (k + 1) // 2), other=0)
        codes = tl.interleave(packed & 0xF, packed >> 4).to(tl.int8)
        if zero_ptr is None:
            q = codes - INT4_SYMMETRIC_ZERO
        else:
            zero = tl.load(zero_ptr + offs_n * n_groups + group, mask=n_mask, other=0)
            q = codes - zero.to(tl.int8)[:, None]
    return q.to(tl.int8), scale
