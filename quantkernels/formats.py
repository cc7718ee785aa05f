"""The stored weight formats, specified once.

Mirrors ``csrc/core/formats.h`` constant for constant; ``docs/FORMATS.md`` is the same spec in prose.
Every fast kernel (C++ per ISA, Triton) is tested against :func:`quantize_weight` /
:meth:`QuantizedWeight.dequantize` here, never the other way round.

A weight ``W`` of shape ``(N, K)`` (or ``(N, C, kh, kw)`` for a conv, flattened to ``K = C*kh*kw`` in that
order) is cut along K into groups of ``group_len`` elements, each with its own float32 scale:

* ``group_size`` in :data:`GROUP_SIZES` -> ``group_len = group_size``;
* ``group_size=None`` (per output channel) -> ``group_len = K`` for int8, ``K`` rounded up to even for int4.

K is zero-padded to ``K_pad = ceil(K / group_len) * group_len``; pad elements quantize to exact zero and the
kernels never read the activation past K.

int8 (``bits=8``, symmetric only)
    ``qdata``  int8    ``(N, K_pad)``, row-major; values in [-127, 127] (-128 is never produced).
    ``scale``  float32 ``(N, K_pad // group_len)``;  ``scale = absmax(group) / 127``.
    ``W[n, k] = qdata[n, k] * scale[n, k // group_len]``.

int4 (``bits=4``)
    ``qdata``  uint8   ``(N, K_pad // 2)``; byte ``j`` of row ``n`` holds element ``2j`` in its low nibble
                       (bits 0-3) and element ``2j + 1`` in its high nibble (bits 4-7). Codes are unsigned 0..15.
    ``scale``  float32 ``(N, K_pad // group_len)``.
    ``zero_point`` uint8 ``(N, K_pad // group_len)`` for asymmetric, values 0..15; ``None`` for symmetric,
                       where the zero point is the constant :data:`INT4_SYMMETRIC_ZERO` = 8.
    ``W[n, k] = (code(n, k) - zero(n, k // group_len)) * scale[n, k // group_len]``.
    symmetric:  ``scale = absmax / 7``, codes 1..15 (code 0, i.e. -8, is never produced, so that the largest
                magnitude in a group round-trips within half a step).
    asymmetric: the range is widened to include 0, ``scale = (max - min) / 15``,
                ``zero = clamp(round(-min / scale), 0, 15)``.

An all-zero group gets ``scale = 0`` and zero codes-minus-zero-point: it dequantizes to exact zeros.
Rounding is round-half-to-even everywhere (``torch.round``, C's ``nearbyint``).

Dynamic int8 activations (the ``*_a8`` ops): each row (token) ``x`` of the activation is quantized
symmetrically, ``s = absmax(x) / 127`` computed in float32 and ``xq = round(x / s)`` with a float32 division,
so the reference and every kernel produce the same integers. A row whose absmax is not finite gives a NaN row.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

FORMAT_VERSION = 1
GROUP_SIZES = (32, 64, 128, 256)
BITS = (4, 8)
INT8_QMAX = 127
INT4_CODE_MAX = 15
INT4_SYMMETRIC_ZERO = 8
INT4_SYMMETRIC_QMAX = 7
ACT_INT8_QMAX = 127
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def group_len_for(bits: int, k: int, group_size: Optional[int]) -> int:
    """Length along K of one scale group, as stored (see the module docstring)."""
    if group_size is not None:
        return group_size
    if bits == 4:
        return k + (k % 2)
    return k


def padded_k(bits: int, k: int, group_size: Optional[int]) -> int:
    g = group_len_for(bits, k, group_size)
    return -(-k // g) * g


def _check_config(bits, group_size, symmetric):
    if bits not in BITS:
        raise ValueError(f"bits: got {bits!r}, expected one of {BITS}")
    if group_size is not None and group_size not in GROUP_SIZES:
        raise ValueError(
            f"group_size: got {group_size!r}, expected one of {GROUP_SIZES} or None (one group per output channel)"
        )
    if bits == 8 and not symmetric:
        raise ValueError("symmetric: got False for bits=8, expected True (int8 weights are symmetric only)")


@dataclasses.dataclass
class QuantizedWeight:
    """A weight in the stored format: the same bytes on every machine (see the module docstring)."""

    bits: int
    group_size: Optional[int]
    symmetric: bool
    shape: tuple
    qdata: torch.Tensor
    scale: torch.Tensor
    zero_point: Optional[torch.Tensor] = None
    format_version: int = FORMAT_VERSION

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def group_len(self) -> int:
        return group_len_for(self.bits, self.in_features, self.group_size)

    def nbytes(self) -> int:
        tensors = [self.qdata, self.scale] + ([self.zero_point] if self.zero_point is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes() / (self.out_features * self.in_features)

    def codes(self) -> torch.Tensor:
        """Integer codes as int16 ``(N, K_pad)``: signed int8 values, or unsigned int4 codes 0..15."""
        return unpack_int4(self.qdata) if self.bits == 4 else self.qdata.to(torch.int16)

    def zero_points(self) -> torch.Tensor:
        """Zero point per group as int16 ``(N, n_groups)`` (zeros for int8, 8 for symmetric int4)."""
        if self.bits == 8:
            return torch.zeros_like(self.scale, dtype=torch.int16)
        if self.zero_point is None:
            return torch.full_like(self.scale, INT4_SYMMETRIC_ZERO, dtype=torch.int16)
        return self.zero_point.to(torch.int16)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight this format encodes, in its original shape."""
        g = self.group_len
        codes = self.codes().to(torch.float64)
        zeros = self.zero_points().to(torch.float64).repeat_interleave(g, dim=1)
        scales = self.scale.to(torch.float64).repeat_interleave(g, dim=1)
        w = (codes - zeros) * scales
        return w[:, : self.in_features].reshape(self.shape).to(dtype)

    def to(self, device) -> "QuantizedWeight":
        zp = self.zero_point.to(device) if self.zero_point is not None else None
        return dataclasses.replace(self, qdata=self.qdata.to(device), scale=self.scale.to(device), zero_point=zp)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15, ``(N, K_pad)`` with K_pad even -> uint8 ``(N, K_pad // 2)``: element 2j low, 2j+1 high."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, K_pad // 2)`` -> int16 codes ``(N, K_pad)``, the inverse of :func:`pack_int4`."""
    p = packed.to(torch.int16)
    return torch.stack([p & 0xF, p >> 4], dim=-1).reshape(p.shape[0], -1)


def check_quantize_args(w, bits: int, group_size: Optional[int], symmetric: bool) -> None:
    """Raises a clear error for a format or weight that :func:`quantize_weight` (or better rounding) can't take."""
    _check_config(bits, group_size, symmetric)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"weight: got {type(w).__name__}, expected a torch.Tensor")
    if w.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"weight: got dtype {w.dtype}, expected one of {WEIGHT_DTYPES}")
    if w.dim() < 2 or w.numel() == 0:
        raise ValueError(f"weight: got shape {tuple(w.shape)}, expected (out_features, in_features, ...) non-empty")
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).nonzero()[0].tolist()
        raise ValueError(f"weight: contains NaN or Inf (first at index {bad}); cannot quantize a non-finite weight")


def quantize_weight(
    w: torch.Tensor, bits: int = 8, group_size: Optional[int] = None, symmetric: bool = True
) -> QuantizedWeight:
    """Round-to-nearest quantization of ``w`` (``(N, K)``, or ``(N, ...)`` flattened to K) into the stored format."""
    check_quantize_args(w, bits, group_size, symmetric)
    groups = weight_groups(w, bits, group_size)
    scale, zero = group_params(groups, bits, symmetric)
    codes = encode_groups(groups, scale, zero, bits, symmetric)
    return from_codes(codes.reshape(codes.shape[0], -1), scale, zero, bits, group_size, symmetric, tuple(w.shape))


# The pieces of quantize_weight, public so that better rounding (quantkernels.accuracy) and fake quantization
# produce the stored grid through the same arithmetic instead of a copy of it.


def code_limits(bits: int, symmetric: bool) -> tuple:
    """The smallest and largest stored code: int8 -127..127, symmetric int4 1..15, asymmetric int4 0..15."""
    if bits == 8:
        return -INT8_QMAX, INT8_QMAX
    return (INT4_SYMMETRIC_ZERO - INT4_SYMMETRIC_QMAX, INT4_CODE_MAX) if symmetric else (0, INT4_CODE_MAX)


def weight_groups(w: torch.Tensor, bits: int, group_size: Optional[int]) -> torch.Tensor:
    """``w`` flattened to ``(N, K)``, zero-padded to K_pad and cut into float32 ``(N, n_groups, group_len)``."""
    n, k = w.shape[0], math.prod(w.shape[1:])
    g = group_len_for(bits, k, group_size)
    k_pad = padded_k(bits, k, group_size)
    wf = torch.zeros(n, k_pad, dtype=torch.float32, device=w.device)
    wf[:, :k] = w.reshape(n, k).to(torch.float32)
    return wf.reshape(n, k_pad // g, g)


def group_params(groups: torch.Tensor, bits: int, symmetric: bool) -> tuple:
    """Round-to-nearest scale and zero point of each group: float32 ``(N, n_groups)`` each.

    The zero point is returned as a float for every format (0 for int8, 8 for symmetric int4) so that
    ``W = (code - zero) * scale`` holds uniformly.
    """
    if symmetric:
        qmax = INT8_QMAX if bits == 8 else INT4_SYMMETRIC_QMAX
        scale = groups.abs().amax(dim=-1) / qmax
        zero = torch.full_like(scale, 0.0 if bits == 8 else float(INT4_SYMMETRIC_ZERO))
        return scale, zero
    lo = groups.amin(dim=-1).clamp(max=0.0)
    hi = groups.amax(dim=-1).clamp(min=0.0)
    scale = (hi - lo) / INT4_CODE_MAX
    safe = torch.where(scale > 0, scale, 1.0)
    zero = torch.where(scale > 0, torch.round(-lo / safe), 0.0).clamp(0, INT4_CODE_MAX)
    return scale, zero


def encode_groups(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool):
    """Codes (float32, same shape as ``groups``) of each element on the grid ``(code - zero) * scale``.

    ``groups`` is ``(N, n_groups, group_len)`` (or any ``(..., group_len)``) and ``scale`` / ``zero`` its
    leading dims. A group with scale 0 gets code = zero, i.e. it dequantizes to exact zeros.
    """
    lo, hi = code_limits(bits, symmetric)
    positive = (scale > 0).unsqueeze(-1)
    safe = torch.where(scale > 0, scale, 1.0).unsqueeze(-1)
    # Divide (not multiply by a reciprocal) so that the rounding matches the C++ reference bit for bit.
    codes = (torch.round(groups / safe) + zero.unsqueeze(-1)).clamp(lo, hi)
    return torch.where(positive, codes, zero.unsqueeze(-1))


def from_codes(codes, scale, zero, bits, group_size, symmetric, shape) -> QuantizedWeight:
    """Packs codes ``(N, K_pad)`` and float32 group scales / zero points into the stored format."""
    if bits == 8:
        qdata = codes.to(torch.int8)
    else:
        qdata = pack_int4(codes)
    zero_point = None if symmetric else zero.to(torch.uint8)
    return QuantizedWeight(bits, group_size, symmetric, tuple(shape), qdata, scale.contiguous(), zero_point)


def quantize_activation_per_token(x: torch.Tensor):
    """Dynamic int8 activation quantization, per row of the last dim: returns (xq float32 integers, scale float32)."""
    xf = x.to(torch.float32)
    scale = xf.abs().amax(dim=-1, keepdim=True) / ACT_INT8_QMAX
    safe = torch.where(scale > 0, scale, 1.0)
    xq = torch.where(scale > 0, torch.round(xf / safe), 0.0)
    return xq, scale
