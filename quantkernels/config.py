"""How a layer is quantized: one small frozen config, shared by the modules, the swap and the accuracy tools."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .formats import _check_config, quantize_weight

ACTIVATIONS = (None, "int8")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Weight format and activation handling of a quantized layer.

    bits: 8 (int8 codes) or 4 (packed int4 codes).
    group_size: None (one scale per output channel) or 32/64/128/256 elements along the input dimension.
    symmetric: int8 is symmetric only; int4 may be asymmetric (a uint8 zero point per group).
    activations: None keeps float activations (weight-only); "int8" quantizes each token (each image for a
        conv) to int8 at run time with its own scale.
    """

    bits: int = 8
    group_size: Optional[int] = None
    symmetric: bool = True
    activations: Optional[str] = None

    def __post_init__(self):
        for name, value in (("bits", self.bits), ("group_size", self.group_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"{name}: got {value!r} ({type(value).__name__}), expected an int")
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric: got {self.symmetric!r} ({type(self.symmetric).__name__}), expected a bool")
        _check_config(self.bits, self.group_size, self.symmetric)
        if self.activations not in ACTIVATIONS:
            raise ValueError(
                f"activations: got {self.activations!r}, expected None (float activations, weight-only) or "
                f"'int8' (dynamic per-token int8)"
            )

    @property
    def act_int8(self) -> bool:
        return self.activations == "int8"

    def describe(self) -> str:
        """Short name, e.g. ``int4 g128 asym`` or ``int8 per-channel w8a8``."""
        groups = f"g{self.group_size}" if self.group_size else "per-channel"
        parts = [f"int{self.bits}", groups]
        if self.bits == 4:
            parts.append("sym" if self.symmetric else "asym")
        if self.act_int8:
            parts.append(f"w{self.bits}a8")
        return " ".join(parts)

    def quantize(self, weight: torch.Tensor):
        """The weight in this config's stored format (round to nearest), a :class:`QuantizedWeight`."""
        return quantize_weight(weight, self.bits, self.group_size, self.symmetric)
