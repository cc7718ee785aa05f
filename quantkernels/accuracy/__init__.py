"""Accuracy tools: keep the accuracy that quantization would cost.

* :func:`calibrate` -- activation ranges per layer (min/max, percentile, MSE-optimal) and static int8 scales.
* :func:`quantize_model` -- ``swap_to_quantized`` with GPTQ (or clipping-search) rounding on calibration data;
  :func:`gptq`, :class:`GPTQSolver` and :func:`search_scales` do the same for one weight.
* :func:`prepare_qat` / :func:`convert_qat` -- quantization-aware training on the kernels' exact grid.
* :func:`sensitivity_analysis`, :func:`choose_mixed_precision`, :func:`auto_mixed_precision` -- which layers
  take int4, and a per-layer choice under an error or size budget, as ``layer_configs`` for the swap.
* :class:`QuantizationReport` -- size, accuracy and latency before and after, as a markdown table.
"""

from .calibration import ActivationRange, MinMaxObserver, MSEObserver, PercentileObserver, calibrate, collect_hessians
from .metrics import OutputError, output_error
from .mixed_precision import MixedPrecisionPlan, auto_mixed_precision, choose_mixed_precision
from .qat import QATConv2d, QATLinear, convert_qat, prepare_qat
from .quantize import WeightRounder, quantize_model
from .report import QuantizationReport
from .rounding import GPTQSolver, gptq, search_scales
from .sensitivity import SensitivityReport, sensitivity_analysis

__all__ = [
    "ActivationRange",
    "MinMaxObserver",
    "PercentileObserver",
    "MSEObserver",
    "calibrate",
    "collect_hessians",
    "OutputError",
    "output_error",
    "search_scales",
    "gptq",
    "GPTQSolver",
    "WeightRounder",
    "quantize_model",
    "QATLinear",
    "QATConv2d",
    "prepare_qat",
    "convert_qat",
    "SensitivityReport",
    "sensitivity_analysis",
    "MixedPrecisionPlan",
    "choose_mixed_precision",
    "auto_mixed_precision",
    "QuantizationReport",
]
