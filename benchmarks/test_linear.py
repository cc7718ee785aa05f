"""CPU linear: quantkernels.linear beside float F.linear and torch's own int4 / int8 kernels (issue 3).

One group per (shape, M); every implementation in a group multiplies the same activations by (a quantization
of) the same weight, so their medians compare directly. ``test_impl_matches_reference`` checks once, at a
small shape, that each implementation computes the product its weight encodes: a baseline fed a mis-laid-out
weight would otherwise look fast and be wrong.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import pytest
import torch
import torch.nn.functional as F

import quantkernels
from quantkernels import reference
from quantkernels.formats import QuantizedWeight, quantize_weight, unpack_int4

from .conftest import Target, clone_tensors, target_marks
from .shapes import ACT_INT8_MS, LINEAR_MS, LINEAR_SHAPES

INT4_GROUP = 128

# Relative error norms ||out - reference|| / ||reference|| each kind of implementation stays within, against
# the float64 product of the weight it encodes (and, for ours with act_int8, the activations it quantizes):
# float32 end to end: a few float32 roundings of the accumulation.
FP32_REL_TOL = 1e-5
# bfloat16 output (and, for torch's kernels, weights dequantized to bfloat16): a rounding of 2**-9 relative
# each, so well under 2**-7.
BF16_REL_TOL = 2.0**-7
# FBGEMM quantizes activations itself, per tensor to 7-bit uint8 (reduce_range): each element is off by up to
# half of range/127; for standard-normal activations (range ~7) that is ~1.6 % RMS against unit RMS, so 5 %
# passes it and still fails any layout mistake (which gives errors of order 100 %).
FBGEMM_REL_TOL = 0.05


@dataclasses.dataclass(frozen=True)
class LinearImpl:
    """One way to compute ``x @ W.T``: how to build its weight from a float32 ``W`` and how to run it."""

    name: str
    weights: str  # implementations with the same weights share their rotated copies
    ours: bool
    act_dtype: torch.dtype
    make: Callable[[torch.Tensor], Any]  # float32 W (N, K) -> weight state
    run: Callable[[torch.Tensor, Any], torch.Tensor]  # (x, weight state) -> y
    weight_bytes: Callable[[Any], int]
    encoded: Callable[[torch.Tensor, Any], torch.Tensor]  # (W, weight state) -> the float64 W it multiplies by
    rel_tol: float
    copy: Callable[[Any], Any] = clone_tensors
    act_int8: bool = False
    ms: tuple = LINEAR_MS


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@functools.lru_cache(maxsize=2)
def quantized(w: torch.Tensor, bits: int, group_size: Optional[int]) -> QuantizedWeight:
    """Quantized once per (weight, format) and shared by every implementation that uses that format."""
    return quantize_weight(w, bits=bits, group_size=group_size, symmetric=True)


def ours(name, bits, group_size, act_dtype, act_int8=False) -> LinearImpl:
    return LinearImpl(
        name=name,
        weights=f"ours int{bits} {group_size}",
        ours=True,
        act_dtype=act_dtype,
        make=lambda w: quantized(w, bits, group_size),
        run=lambda x, qw: quantkernels.linear(x, qw, act_int8=act_int8),
        weight_bytes=QuantizedWeight.nbytes,
        encoded=lambda w, qw: qw.dequantize(torch.float64),
        rel_tol=FP32_REL_TOL if act_dtype == torch.float32 else BF16_REL_TOL,
        act_int8=act_int8,
        ms=ACT_INT8_MS if act_int8 else LINEAR_MS,
    )


def float_linear(dtype) -> LinearImpl:
    return LinearImpl(
        name=f"{'fp32' if dtype == torch.float32 else 'bf16'} F.linear",
        weights=f"{dtype}",
        ours=False,
        act_dtype=dtype,
        make=lambda w: w.to(dtype),
        run=F.linear,
        weight_bytes=tensor_bytes,
        encoded=lambda w, state: state.double(),
        rel_tol=FP32_REL_TOL if dtype == torch.float32 else BF16_REL_TOL,
    )


def aten_int4pack_weight(w: torch.Tensor):
    """Our int4 g128 symmetric weight in the layout of torch's CPU int4 kernel.

    torch's format (its test_linalg ``_group_quantize_tensor``): int32 codes (N, K) in 0..15, packed by
    ``_convert_weight_to_int4pack_for_cpu`` (whose inner-K-tiles argument the CPU packer ignores), and
    ``scales_and_zeros`` of shape (K / group, N, 2) in bfloat16 with ``W = (code - 8) * scale + zero``. Our
    symmetric codes are ``q + 8``, so the same codes with ``zero = 0`` encode our weight, up to rounding the
    float32 scales to bfloat16.
    """
    qw = quantized(w, 4, INT4_GROUP)
    codes = unpack_int4(qw.qdata)[:, : qw.in_features].to(torch.int32).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scales_and_zeros = torch.stack([qw.scale.T, torch.zeros_like(qw.scale.T)], dim=-1).to(torch.bfloat16)
    return packed, scales_and_zeros.contiguous()


def aten_int4pack_encoded(w, state):
    qw = quantized(w, 4, INT4_GROUP)
    return dataclasses.replace(qw, scale=qw.scale.to(torch.bfloat16).float()).dequantize(torch.float64)


def aten_int8pack(dtype) -> LinearImpl:
    # torch's kernel wants per-channel scales in the activations' dtype.
    def make(w):
        qw = quantized(w, 8, None)
        return qw.qdata, qw.scale[:, 0].to(dtype)

    def encoded(w, state):
        qdata, scale = state
        return qdata.double() * scale.double()[:, None]

    return LinearImpl(
        name=f"aten int8pack {'fp32' if dtype == torch.float32 else 'bf16'}",
        weights=f"aten int8pack {dtype}",
        ours=False,
        act_dtype=dtype,
        make=make,
        run=lambda x, state: torch.ops.aten._weight_int8pack_mm(x, *state),
        weight_bytes=lambda state: tensor_bytes(*state),
        encoded=encoded,
        rel_tol=FP32_REL_TOL if dtype == torch.float32 else BF16_REL_TOL,
    )


def fbgemm_dynamic(w: torch.Tensor):
    """``torch.ao.quantization.quantize_dynamic`` on an ``nn.Linear``: what a PyTorch user gets today."""
    from torch.ao.quantization import quantize_dynamic

    torch.backends.quantized.engine = "fbgemm"
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data = w
    return quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear}, dtype=torch.qint8)[0]


def fbgemm_copy(module):
    # Another module with the same int8 weight packed again (FBGEMM's packed weights live in the module).
    from torch.ao.nn.quantized.dynamic import Linear

    new = Linear(module.in_features, module.out_features, bias_=False, dtype=torch.qint8)
    new.set_weight_bias(module.weight(), None)
    return new


LINEAR_IMPLS = (
    ours("ours int4 g128 fp32", 4, INT4_GROUP, torch.float32),
    ours("ours int4 g128 bf16", 4, INT4_GROUP, torch.bfloat16),
    ours("ours w4a8 g128 fp32", 4, INT4_GROUP, torch.float32, act_int8=True),
    ours("ours int8 fp32", 8, None, torch.float32),
    ours("ours int8 bf16", 8, None, torch.bfloat16),
    ours("ours w8a8 fp32", 8, None, torch.float32, act_int8=True),
    float_linear(torch.float32),
    float_linear(torch.bfloat16),
    LinearImpl(
        name="aten int4pack bf16",
        weights="aten int4pack",
        ours=False,
        act_dtype=torch.bfloat16,
        make=aten_int4pack_weight,
        run=lambda x, state: torch.ops.aten._weight_int4pack_mm_for_cpu(x, state[0], INT4_GROUP, state[1]),
        weight_bytes=lambda state: tensor_bytes(*state),
        encoded=aten_int4pack_encoded,
        rel_tol=BF16_REL_TOL,
    ),
    aten_int8pack(torch.float32),
    aten_int8pack(torch.bfloat16),
    LinearImpl(
        name="FBGEMM dynamic int8 fp32",
        weights="FBGEMM",
        ours=False,
        act_dtype=torch.float32,
        make=fbgemm_dynamic,
        run=lambda x, module: module(x),
        weight_bytes=lambda module: tensor_bytes(module.weight()),
        encoded=lambda w, module: module.weight().dequantize().double(),
        copy=fbgemm_copy,
        rel_tol=FBGEMM_REL_TOL,
    ),
)

# Issue 3's goals, for every shape: {(implementation, M): targets}.
LINEAR_TARGETS = {
    ("ours int4 g128 fp32", 1): (Target("fp32 F.linear", min_speedup=8.0, issue=3),
                                 Target("floor", max_floor_ratio=1.3, issue=3)),
    ("ours int4 g128 bf16", 1): (Target("bf16 F.linear", min_speedup=3.5, issue=3),
                                 Target("aten int4pack bf16", min_speedup=1.0, issue=3)),
    ("ours int4 g128 bf16", 8): (Target("aten int4pack bf16", min_speedup=3.0, issue=3),
                                 Target("floor", max_floor_ratio=2.0, issue=3)),
    ("ours int8 fp32", 1): (Target("fp32 F.linear", min_speedup=3.5, issue=3),
                            Target("aten int8pack fp32", min_speedup=1.0, issue=3)),
    ("ours w8a8 fp32", 128): (Target("bf16 F.linear", min_speedup=1.2, issue=3),
                              Target("FBGEMM dynamic int8 fp32", min_speedup=1.5, issue=3)),
    ("ours w4a8 g128 fp32", 128): (Target("bf16 F.linear", min_speedup=1.0, issue=3),
                                   Target("fp32 F.linear", min_speedup=3.0, issue=3)),
}


@functools.lru_cache(maxsize=1)
def float_weight(n: int, k: int) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(0)) / k**0.5


# Ordered shape, then implementation, then M: consecutive cases share one weight and its rotated copies
# (implementations with the same weights are listed side by side for the same reason).
CASES = [
    pytest.param(shape, impl, m, id=f"{shape[0]}x{shape[1]}-{impl.name.replace(' ', '_')}-M{m}",
                 marks=target_marks({i.name: LINEAR_TARGETS.get((i.name, m), ()) for i in LINEAR_IMPLS}, impl.name))
    for shape in LINEAR_SHAPES
    for impl in LINEAR_IMPLS
    for m in impl.ms
]


@pytest.mark.parametrize("shape,impl,m", CASES)
def test_linear(bench, shape, impl, m):
    n, k = shape
    w = float_weight(n, k)
    x = torch.randn(m, k).to(impl.act_dtype)
    bench(
        group=f"linear {n}x{k} M={m}",
        impl=impl.name,
        ours=impl.ours,
        make=lambda: impl.make(w),
        copy=impl.copy,
        call=lambda state: impl.run(x, state),
        weight_bytes=impl.weight_bytes,
        flops=2 * m * n * k,
        key=(impl.weights, shape),
        targets=LINEAR_TARGETS.get((impl.name, m), ()),
        kind="linear",
        shape=f"{n}x{k}",
        M=m,
    )


@pytest.mark.parametrize("impl", LINEAR_IMPLS, ids=lambda impl: impl.name.replace(" ", "_"))
def test_impl_matches_reference(impl):
    n, k, m = 96, 2 * INT4_GROUP, 3
    w = torch.randn(n, k) / k**0.5
    x = torch.randn(m, k).to(impl.act_dtype)
    state = impl.make(w)
    out = impl.run(x, state)
    x_used = reference.quantize_rows_int8(x, 1) if impl.act_int8 else x.double()
    want = x_used @ impl.encoded(w, state).T
    assert out.shape == (m, n) and out.dtype == impl.act_dtype
    rel = ((out.double() - want).norm() / want.norm()).item()
    assert rel <= impl.rel_tol, f"{impl.name}: relative error {rel:.3g} > {impl.rel_tol:.3g}"
