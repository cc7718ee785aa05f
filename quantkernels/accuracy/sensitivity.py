"""Which layers can take int4: quantize one layer at a time and measure what happens to the model's output.

:func:`sensitivity_analysis` quantizes each layer alone in each candidate format (rounded by RTN, the
clipping search or GPTQ) and compares the model's outputs on calibration batches with the float model's.
The :class:`SensitivityReport` ranks the layers; :func:`choose_mixed_precision` picks a format per layer from
it under an error budget or a size budget and returns ``layer_configs`` for ``swap_to_quantized``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..config import QuantConfig
from ..formats import QuantizedWeight
from ..nn.swap import plan_swap
from . import calibration
from .fake_quant import simulated
from .metrics import OutputError, output_error
from .quantize import WeightRounder

#: Formats tried per layer by default, cheapest first: int4 in large and small groups, then int8.
DEFAULT_CANDIDATES = (
    QuantConfig(bits=4, group_size=128, symmetric=False),
    QuantConfig(bits=4, group_size=32, symmetric=False),
    QuantConfig(bits=8),
)


@dataclasses.dataclass(frozen=True)
class LayerSensitivity:
    """One layer quantized alone: the model's output error and the stored size in each candidate format."""

    name: str
    weights: int  # number of weight elements
    float_bits: int  # the float weight's size in bits
    errors: Dict[QuantConfig, OutputError]  # candidates the layer can take (stored smaller than float)
    stored_bits: Dict[QuantConfig, int]  # codes, scales and zero points


@dataclasses.dataclass
class SensitivityReport:
    """Per-layer sensitivity; ``str()`` is a markdown table, most sensitive layer first."""

    candidates: Tuple[QuantConfig, ...]
    layers: Dict[str, LayerSensitivity]
    method: str
    quantized: Dict[Tuple[str, QuantConfig], QuantizedWeight] = dataclasses.field(repr=False)

    def ranking(self, config: Optional[QuantConfig] = None) -> List[LayerSensitivity]:
        """Layers by decreasing output error in ``config`` (default: the first, cheapest candidate)."""
        config = config or self.candidates[0]
        return sorted(self.layers.values(), key=lambda layer: layer.errors[config].distance if config in layer.errors
                      else -1.0, reverse=True)

    def __str__(self) -> str:
        head = ["rank", "layer", "weights"] + [f"cos {c.describe()}" for c in self.candidates]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for i, layer in enumerate(self.ranking(), 1):
            cells = [str(i), layer.name, f"{layer.weights:,}"] + [
                f"{layer.errors[c].cosine:.5f}" if c in layer.errors else "-" for c in self.candidates
            ]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def sensitivity_analysis(
    model: nn.Module,
    batches: Sequence,
    candidates: Iterable[QuantConfig] = DEFAULT_CANDIDATES,
    *,
    method: str = "gptq",
    run_fn: Optional[Callable] = None,
    output_fn: Optional[Callable] = None,
    skip: Iterable[str] = (),
    filter_fn: Optional[Callable] = None,
) -> SensitivityReport:
    """Quantizes each layer ``swap_to_quantized(model, skip=skip, filter_fn=filter_fn)`` would swap, alone, in
    each candidate format, and measures the model's outputs on ``batches`` against the float model's.

    ``method`` is ``"rtn"``, ``"search"`` or ``"gptq"`` (see :class:`~quantkernels.accuracy.WeightRounder`).
    ``output_fn(output)`` picks the tensor to compare from a model output that is not one (default: the first
    floating tensor). A candidate whose stored weight would not be smaller than the float one (a small K in a
    large group, which the swap refuses) is left out for that layer.
    """
    candidates = tuple(candidates)
    if not candidates or not all(isinstance(c, QuantConfig) for c in candidates):
        raise TypeError(f"candidates: got {candidates!r}, expected one or more QuantConfig objects")
    batches = list(batches)
    plan = plan_swap(model, skip=skip, filter_fn=filter_fn)
    modules = {name: model.get_submodule(name) for name, c in plan.items() if c is not None}
    rounder = WeightRounder(model, batches, modules, method=method, run_fn=run_fn)
    reference = calibration.run_batches(model, batches, run_fn)
    results, quantized = {}, {}
    for name, module in modules.items():
        w = module.weight
        float_bits = 8 * w.numel() * w.element_size()
        errors, sizes = {}, {}
        for config in candidates:
            qw = rounder.round(name, config)
            if 8 * qw.nbytes() >= float_bits:
                continue
            quantized[(name, config)] = qw
            with simulated(modules, {name: (qw, config.act_int8)}):
                errors[config] = output_error(reference, calibration.run_batches(model, batches, run_fn), output_fn)
            sizes[config] = 8 * qw.nbytes()
        results[name] = LayerSensitivity(name, w.numel(), float_bits, errors, sizes)
    return SensitivityReport(candidates, results, method, quantized)
