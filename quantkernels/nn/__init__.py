"""Quantized modules and the model-level entry point.

``swap_to_quantized(model, ...)`` replaces ``nn.Linear`` / ``nn.Conv2d`` by :class:`QuantizedLinear` /
:class:`QuantizedConv2d` in place (with ``fold_batchnorm=True``, after :func:`fold_batchnorm`) and sets a
:class:`SwapReport` as ``model.quantization_report``;
:func:`save_quantized` / :func:`load_quantized` round-trip the result through safetensors.
"""

from ..config import QuantConfig
from .fold import FoldedBatchNorm2d, fold_batchnorm
from .modules import QuantizedConv2d, QuantizedLinear, QuantizedModule, quantize_with_sqnr, sqnr_db, weight_sqnr_db
from .serialization import load_quantized, save_quantized
from .swap import LayerReport, SwapReport, plan_swap, swap_to_quantized

__all__ = [
    "QuantConfig",
    "QuantizedModule",
    "QuantizedLinear",
    "QuantizedConv2d",
    "quantize_with_sqnr",
    "sqnr_db",
    "weight_sqnr_db",
    "swap_to_quantized",
    "plan_swap",
    "fold_batchnorm",
    "FoldedBatchNorm2d",
    "SwapReport",
    "LayerReport",
    "save_quantized",
    "load_quantized",
]
