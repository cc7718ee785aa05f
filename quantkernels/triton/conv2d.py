"""quant::conv2d_{int8,int4} on CUDA: an implicit GEMM, patches gathered from x inside the kernel (no im2col
buffer), one grid slice per conv group."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import ops
from . import configs
from .activations import quantize_rows
from .dequant import load_weight_tile
from .launch import Launch
from .linear import plan_matmul
from .tiles import contract, finish_tile, tile_coords


@triton.jit
def conv2d_kernel(x_ptr, x_scale_ptr, w_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr,
                  m, n, k, channels, in_h, in_w, out_h, out_w, kernel_w, kernel_area,
                  stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                  stride_xb, stride_xc, stride_xh, stride_xw, stride_wn, n_groups, group_len,
                  stride_ob, stride_oc, stride_oh, stride_ow,
                  BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr, NUM_STAGES: tl.constexpr, TAP_MAJOR: tl.constexpr):
    """One output tile of conv group ``program_id(1)`` as a GEMM over rows ``(image, oh, ow)`` (m of them)
    and columns ``(c, r, s)`` (k = channels * kernel_area, the stored weight's flattening order):

    ``out[image, g*n + j, oh, ow] = x_scale[image] * sum_k patch[(image, oh, ow), k] * W[g*n + j, k] + bias``

    x: [batch, groups*channels, in_h, in_w] with any strides, float or int8 codes (then float32 ``x_scale``
    per image, else None); a patch element outside the image reads as zero (the padding). W: the stored
    weight [groups*n, k] (see ``load_weight_tile``), bias float32 or None, out with any strides.

    ``TAP_MAJOR`` (int8 weights, one group per row): K is walked tap by tap, and within a tap over channel
    tiles, so that a patch row's address and padding mask are computed once per tap and its channels are
    adjacent in memory for channels_last input (in (c, r, s) order a K tile gathers one element per channel
    and tap, with divisions per element: ResNet-50's 3x3 layers ran 1.9-3.3x faster tap by tap on an H100).
    The weight columns of a tile are then ``kernel_area`` apart, gathered from L2. Otherwise K runs in the
    stored (c, r, s) order, each tile inside one scale group.
    """
    pid_m, pid_n = tile_coords(tl.program_id(0), m, n, BLOCK_M, BLOCK_N, GROUP_M)
    group = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < m
    n_mask = offs_n < n

    # Rows -> (image, oh, ow) and the top-left input pixel of each row's patch.
    image = offs_m // (out_h * out_w)
    pixel = offs_m % (out_h * out_w)
    oh = pixel // out_w
    ow = pixel % out_w
    top = oh * stride_h - pad_h
    left = ow * stride_w - pad_w
    x_rows = x_ptr + image.to(tl.int64) * stride_xb + (group * channels).to(tl.int64) * stride_xc

    # This group's slice of the weight: rows group*n ... group*n + n - 1.
    w_ptr += (group * n).to(tl.int64) * stride_wn
    scale_ptr += group * n * n_groups
    if zero_ptr is not None:
        zero_ptr += group * n * n_groups
    if bias_ptr is not None:
        bias_ptr += group * n

    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if TAP_MAJOR:
        for tap in range(0, kernel_area):
            ih = top + (tap // kernel_w) * dil_h
            iw = left + (tap % kernel_w) * dil_w
            inside = m_mask & (ih >= 0) & (ih < in_h) & (iw >= 0) & (iw < in_w)
            pixels = x_rows + ih * stride_xh + iw * stride_xw
            for c0 in tl.range(0, channels, BLOCK_K, num_stages=NUM_STAGES):
                offs_c = c0 + tl.arange(0, BLOCK_K)
                c_mask = offs_c < channels
                patch = tl.load(pixels[:, None] + offs_c[None, :] * stride_xc, mask=inside[:, None] & c_mask[None, :],
                                other=0)
                q = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + (offs_c * kernel_area + tap)[None, :],
                            mask=n_mask[:, None] & c_mask[None, :], other=0)
                acc += contract(patch, q).to(tl.float32)
        acc *= tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    else:
        for k0 in tl.range(0, k, BLOCK_K, num_stages=NUM_STAGES):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            c = offs_k // kernel_area
            r = (offs_k % kernel_area) // kernel_w
            s = offs_k % kernel_w
            ih = top[:, None] + r[None, :] * dil_h
            iw = left[:, None] + s[None, :] * dil_w
            inside = (ih >= 0) & (ih < in_h) & (iw >= 0) & (iw < in_w)
            patch = tl.load(x_rows[:, None] + c[None, :] * stride_xc + ih * stride_xh + iw * stride_xw,
                            mask=m_mask[:, None] & (offs_k[None, :] < k) & inside, other=0)
            q, w_scale = load_weight_tile(w_ptr, scale_ptr, zero_ptr, offs_n, k0, n, k, stride_wn, n_groups,
                                          group_len, BITS, BLOCK_K)
            acc += contract(patch, q).to(tl.float32) * w_scale[None, :]

    acc = finish_tile(acc, x_scale_ptr, image, m_mask, bias_ptr, offs_n, n_mask)
    out = (out_ptr + image[:, None].to(tl.int64) * stride_ob + (group * n + offs_n)[None, :] * stride_oc
           + oh[:, None] * stride_oh + ow[:, None] * stride_ow)
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def plan_conv2d(bits, x, qweight, scale, zero_point, bias, kernel_size, stride, padding, dilation, groups,
                quantize_input):
    """Checks the arguments like the CPU kernels and returns ``(out, launches)``."""
    out_h, out_w = ops.check_conv2d(bits, x, qweight, scale, zero_point, bias, kernel_size, stride, padding,
                                    dilation, groups)
    out = ops._conv_out(x, qweight, kernel_size, stride, padding, dilation)
    batch = x.shape[0]
    if batch == 0:
        return out, []
    channels, n = x.shape[1] // groups, qweight.shape[0] // groups
    k = channels * math.prod(kernel_size)
    k_pad = qweight.shape[1] * (2 if bits == 4 else 1)
    group_len = k_pad // scale.shape[1]
    qweight, scale = qweight.contiguous(), scale.contiguous()
    zero_point = zero_point.contiguous() if zero_point is not None else None
    bias = bias.to(torch.float32).contiguous() if bias is not None else None
    m = batch * out_h * out_w

    if (list(kernel_size) == [1, 1] and list(stride) == [1, 1] and list(padding) == [0, 0] and groups == 1
            and not quantize_input and out.stride(1) == 1):
        # channels_last 1x1 with float activations is a GEMM over pixel rows (views of x and out): linear's
        # kernel, with contiguous K tiles and no per-row patch arithmetic (docs/benchmarks/h100-triton.md).
        return out, plan_matmul(bits, x.permute(0, 2, 3, 1).reshape(m, channels), None, qweight, scale, zero_point,
                                bias, out.permute(0, 2, 3, 1).view(m, n), group_len)

    launches = []
    x_scale = None
    if quantize_input:
        # One scale per image: quantize each image's memory as one row, keeping x's layout for the codes.
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous()
        xq = torch.empty_like(x, dtype=torch.int8)
        x_scale = torch.empty(batch, dtype=torch.float32, device=x.device)
        launches.extend(quantize_rows(x, xq, x_scale, batch, math.prod(x.shape[1:]), x.stride(0), 1))
        x = xq

    config = configs.pick(configs.CONV2D_CONFIGS, m).specialize(
        group_len, single_group=scale.shape[1] == 1, activation_bytes=x.element_size())
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n), groups)
    launches.append(Launch(
        conv2d_kernel, grid,
        dict(x_ptr=x, x_scale_ptr=x_scale, w_ptr=qweight, scale_ptr=scale, zero_ptr=zero_point, bias_ptr=bias,
             out_ptr=out, m=m, n=n, k=k, channels=channels, in_h=x.shape[2], in_w=x.shape[3], out_h=out_h,
             out_w=out_w, kernel_w=kernel_size[1], kernel_area=kernel_size[0] * kernel_size[1],
             stride_h=stride[0], stride_w=stride[1], pad_h=padding[0], pad_w=padding[1], dil_h=dilation[0],
             dil_w=dilation[1], stride_xb=x.stride(0), stride_xc=x.stride(1), stride_xh=x.stride(2),
             stride_xw=x.stride(3), stride_wn=qweight.stride(0), n_groups=scale.shape[1], group_len=group_len,
             stride_ob=out.stride(0), stride_oc=out.stride(1), stride_oh=out.stride(2), stride_ow=out.stride(3),
             BITS=bits, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
             GROUP_M=config.group_m, NUM_STAGES=config.num_stages,
             TAP_MAJOR=configs.tap_major(config, bits, scale.shape[1], channels, x.element_size())),
        num_warps=config.num_warps,
    ))
    return out, launches


def conv2d(bits, x, qweight, scale, zero_point, bias, kernel_size, stride, padding, dilation, groups,
           quantize_input):
    """``F.conv2d`` with the stored weight, computed by the Triton kernel (see ``plan_conv2d``)."""
    out, launches = plan_conv2d(bits, x, qweight, scale, zero_point, bias, kernel_size, stride, padding,
                                dilation, groups, quantize_input)
    for launch in launches:
        launch()
    return out
