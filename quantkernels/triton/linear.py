"""quant::linear_{int8,int4,w8a8,w4a8} on CUDA: one tiled kernel whose configuration picks the family.

* M = 1, GEMV: 1 x 32 output tiles contracted with FMAs; K split over several programs.
* M = 2..16, skinny: 16 x 64 tiles on tensor cores (rows padded to the MMA's 16); K split likewise.
* M > 16, GEMM: 64 x 64 or 128 x 64 tiles on tensor cores, whole K per program, visited in L2-friendly bands.

Split-K is atomic-free and deterministic: each program writes its float32 partial tile to a
``[splits, M, N]`` buffer and a second kernel sums the splits in a fixed order, adds the bias and casts. At
M <= 16 that buffer is small next to the weight (M=1, N=4096, 4 splits: 64 KB against 8 MB of int4), while a
single program per output tile walking all of K would leave too few programs to keep the weight streaming
(4096 / 32 = 128 programs for 132 SMs). Atomics would save the second launch but make the float sums depend
on the order programs finish.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import ops
from . import configs
from .activations import quantize_rows
from .dequant import load_weight_tile
from .launch import Launch
from .tiles import contract, finish_tile, tile_coords


@triton.jit
def linear_kernel(x_ptr, x_scale_ptr, w_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr,
                  m, n, k, stride_xm, stride_xk, stride_wn, n_groups, group_len,
                  stride_out_split, stride_om, stride_on, k_tiles_per_split,
                  BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr, NUM_STAGES: tl.constexpr):
    """``out[split] = (x[m, K range] @ W[n, K range]^T) * x_scale[m] + bias[n]`` for one output tile.

    x: [m, k] float16/bfloat16/float32, or int8 codes with float32 ``x_scale`` [m] (else None).
    W: stored int8/int4 (``BITS``) with scale and zero point, see ``load_weight_tile``. bias: float32 [n]
    or None. out: [splits, m, n] (``stride_out_split`` apart) in out's dtype. Program (pid, split) computes
    the tile ``tile_coords(pid)`` over K tiles ``split * k_tiles_per_split ...`` (all of K when unsplit).
    """
    pid_m, pid_n = tile_coords(tl.program_id(0), m, n, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < m
    n_mask = offs_n < n
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm

    k_begin = split * k_tiles_per_split * BLOCK_K
    k_end = tl.minimum(k, k_begin + k_tiles_per_split * BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    # Loads run NUM_STAGES - 1 tiles ahead (cp.async into shared memory); the loop-level setting pipelines
    # the FMA GEMV too, which the kernel-level num_stages leaves alone (it has no tl.dot).
    for k0 in tl.range(k_begin, k_end, BLOCK_K, num_stages=NUM_STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=m_mask[:, None] & (offs_k[None, :] < k), other=0)
        q, w_scale = load_weight_tile(w_ptr, scale_ptr, zero_ptr, offs_n, k0, n, k, stride_wn, n_groups,
                                      group_len, BITS, BLOCK_K)
        acc += contract(x, q).to(tl.float32) * w_scale[None, :]

    acc = finish_tile(acc, x_scale_ptr, offs_m, m_mask, bias_ptr, offs_n, n_mask)
    out = out_ptr + split * stride_out_split + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def splitk_reduce_kernel(partial_ptr, bias_ptr, out_ptr, splits, m, n, BLOCK: tl.constexpr):
    """``out[i] = sum_s partial[s, i] + bias[i % n]`` over the flattened [m, n] output, splits in order."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < m * n
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in range(0, splits):
        acc += tl.load(partial_ptr + s * m * n + offs, mask=mask, other=0.0)
    if bias_ptr is not None:
        acc += tl.load(bias_ptr + offs % n, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def plan_linear(bits, act_int8, x, qweight, scale, zero_point, bias):
    """Checks the arguments like the CPU kernels and returns ``(out, launches)``; running the launches in
    order fills ``out``."""
    group_len = ops.check_linear(bits, x, qweight, scale, zero_point, bias)
    k, n = x.shape[-1], qweight.shape[0]
    out = ops._linear_out(x, qweight)
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 0:
        return out, []
    qweight, scale = qweight.contiguous(), scale.contiguous()
    zero_point = zero_point.contiguous() if zero_point is not None else None
    bias = bias.to(torch.float32).contiguous() if bias is not None else None

    launches = []
    x_scale = None
    if act_int8:
        xq = torch.empty(m, k, dtype=torch.int8, device=x.device)
        x_scale = torch.empty(m, dtype=torch.float32, device=x.device)
        launches.extend(quantize_rows(x2, xq, x_scale, m, k, x2.stride(0), x2.stride(1)))
        x2 = xq

    return out, launches + plan_matmul(bits, x2, x_scale, qweight, scale, zero_point, bias, out.view(m, n),
                                       group_len)


def plan_matmul(bits, x2, x_scale, qweight, scale, zero_point, bias, out2, group_len):
    """``linear_kernel`` launches (and the split-K reduce) for ``out2 = (x2 @ W.T) * x_scale + bias``: x2 [m, k]
    and out2 [m, n] with any strides, the weight tensors contiguous, bias float32 or None."""
    (m, k), n = x2.shape, out2.shape[1]
    config = configs.pick(configs.LINEAR_CONFIGS, m).specialize(
        group_len, single_group=scale.shape[1] == 1, activation_bytes=x2.element_size())
    output_tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    k_tiles = triton.cdiv(k, config.block_k)
    tiles_per_split = triton.cdiv(k_tiles, configs.split_k(config, output_tiles, k_tiles))
    splits = triton.cdiv(k_tiles, tiles_per_split)
    partial = torch.empty(splits, m, n, dtype=torch.float32, device=x2.device) if splits > 1 else out2.unsqueeze(0)
    launches = [Launch(
        linear_kernel, (output_tiles, splits),
        dict(x_ptr=x2, x_scale_ptr=x_scale, w_ptr=qweight, scale_ptr=scale, zero_ptr=zero_point,
             bias_ptr=bias if splits == 1 else None, out_ptr=partial, m=m, n=n, k=k, stride_xm=x2.stride(0),
             stride_xk=x2.stride(1), stride_wn=qweight.stride(0), n_groups=scale.shape[1], group_len=group_len,
             stride_out_split=partial.stride(0), stride_om=partial.stride(1), stride_on=partial.stride(2),
             k_tiles_per_split=tiles_per_split, BITS=bits, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
             BLOCK_K=config.block_k, GROUP_M=config.group_m, NUM_STAGES=config.num_stages),
        num_warps=config.num_warps,
    )]
    if splits > 1:
        launches.append(Launch(
            splitk_reduce_kernel, (triton.cdiv(m * n, configs.ELEMENTWISE_BLOCK),),
            dict(partial_ptr=partial, bias_ptr=bias, out_ptr=out2, splits=splits, m=m, n=n,
                 BLOCK=configs.ELEMENTWISE_BLOCK),
            num_warps=configs.ELEMENTWISE_WARPS,
        ))
    return launches


def linear(bits, act_int8, x, qweight, scale, zero_point=None, bias=None):
    """``x @ W.T + bias`` with the stored weight, computed by the Triton kernels (see ``plan_linear``)."""
    out, launches = plan_linear(bits, act_int8, x, qweight, scale, zero_point, bias)
    for launch in launches:
        launch()
    return out
