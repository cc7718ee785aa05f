"""quantkernels: int8/int4 quantized linear and conv2d kernels for PyTorch.

``import quantkernels`` registers the ``torch.ops.quant`` ops with their CPU kernels. The Triton (CUDA)
kernels are registered only where CUDA is available and Triton is installed; nothing here queries a GPU or
imports Triton otherwise.
"""

from . import ops
from .accuracy import (
    QuantizationReport,
    auto_mixed_precision,
    calibrate,
    choose_mixed_precision,
    convert_qat,
    prepare_qat,
    quantize_model,
    sensitivity_analysis,
)
from .config import QuantConfig
from .formats import FORMAT_VERSION, GROUP_SIZES, QuantizedWeight, quantize_weight
from .nn import fold_batchnorm, load_quantized, plan_swap, save_quantized, swap_to_quantized
from .ops import active_isa, conv2d, linear, set_isa, supported_isas


def _register_gpu_kernels() -> None:
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
        from .triton import register  # noqa: F401


_register_gpu_kernels()

__all__ = [
    "FORMAT_VERSION",
    "GROUP_SIZES",
    "QuantizedWeight",
    "quantize_weight",
    "QuantConfig",
    "swap_to_quantized",
    "fold_batchnorm",
    "plan_swap",
    "save_quantized",
    "load_quantized",
    "linear",
    "conv2d",
    "active_isa",
    "supported_isas",
    "set_isa",
    "calibrate",
    "quantize_model",
    "prepare_qat",
    "convert_qat",
    "sensitivity_analysis",
    "choose_mixed_precision",
    "auto_mixed_precision",
    "QuantizationReport",
]
