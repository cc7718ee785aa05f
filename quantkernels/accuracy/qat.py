"""Quantization-aware training: fine-tune a model through the quantization it will be deployed with.

``prepare_qat(model, config)`` replaces each ``nn.Linear`` / ``nn.Conv2d`` by :class:`QATLinear` /
:class:`QATConv2d`, which keep the float weight as the trained parameter but compute with it fake-quantized
onto the stored grid (exactly :func:`~quantkernels.formats.quantize_weight`'s), and with activations
fake-quantized per token / image when the config says ``activations="int8"``. Gradients pass the rounding
straight through. After an ordinary training loop, ``convert_qat(model)`` turns each QAT layer into the
packed kernels with :func:`~quantkernels.swap_to_quantized`: quantizing the trained float weight reproduces
the grid the model was trained on, so the converted model computes what the QAT model computed.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QuantConfig
from ..nn.fold import fold_before_rounding
from ..nn.swap import module_slots, plan_swap, replace_module, swap_to_quantized
from .fake_quant import fake_quantize_input, fake_quantize_weight


class _QATMixin:
    config: QuantConfig

    def fake_weight(self) -> torch.Tensor:
        c = self.config
        return fake_quantize_weight(self.weight, c.bits, c.group_size, c.symmetric)

    def fake_input(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_input(self, x) if self.config.act_int8 else x

    @classmethod
    def from_float(cls, module, config: QuantConfig):
        """A QAT layer sharing ``module``'s parameters (an optimizer built on them keeps working)."""
        qat = cls.__new__(cls)
        qat.__dict__.update(module.__dict__)
        qat._parameters = dict(module._parameters)
        qat._buffers = dict(module._buffers)
        qat._modules = dict(module._modules)
        qat.config = config
        return qat

    def to_float(self):
        """The plain float layer with the same parameters, for conversion."""
        module = self.float_type.__new__(self.float_type)
        module.__dict__.update(self.__dict__)
        del module.__dict__["config"]
        return module

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, qat={self.config.describe()}"


class QATLinear(_QATMixin, nn.Linear):
    float_type = nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.fake_input(x), self.fake_weight(), self.bias)


class QATConv2d(_QATMixin, nn.Conv2d):
    float_type = nn.Conv2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.fake_input(x), self.fake_weight(), self.bias)


QAT_TYPES = {nn.Linear: QATLinear, nn.Conv2d: QATConv2d}


def prepare_qat(model: nn.Module, config: Optional[QuantConfig] = None, **swap_kwargs) -> nn.Module:
    """Replaces, in place, each layer ``swap_to_quantized(model, config, **swap_kwargs)`` would quantize by
    its QAT version in the format it would get; returns the model.

    Takes exactly ``swap_to_quantized``'s arguments (``bits=``, ``group_size=``, ``skip=``, ``layer_configs=``,
    ``filter_fn=``, ...), so the layers trained with fake quantization are the ones that will be converted;
    ``fold_batchnorm=True`` folds now (the model in eval mode), so training sees the folded convs.
    The float parameters are kept (shared, not copied): train with any optimizer, then :func:`convert_qat`.
    """
    fold_before_rounding(model, swap_kwargs)
    plan = plan_swap(model, config, **swap_kwargs)
    slots = module_slots(model)
    for name, layer_config in plan.items():
        if layer_config is None:
            continue
        module = model.get_submodule(name)
        qat_type = next(q for t, q in QAT_TYPES.items() if isinstance(module, t))
        qat = qat_type.from_float(module, layer_config)
        if name:
            replace_module(model, slots[name], qat)
        else:
            model = qat
    return model


def qat_layers(model: nn.Module) -> Dict[str, _QATMixin]:
    return {name: m for name, m in model.named_modules() if isinstance(m, _QATMixin)}


def convert_qat(model: nn.Module, *, progress: Optional[bool] = None) -> nn.Module:
    """Swaps every QAT layer of ``model`` for the packed kernels in its trained format, in place.

    The trained float weight is quantized by ``swap_to_quantized``'s round-to-nearest, which lands on exactly
    the grid the QAT layer computed with, so the converted model's outputs match the QAT model's within the
    kernels' float tolerance. Raises if a QAT layer cannot be swapped (it would silently lose its quantization).
    """
    layers = qat_layers(model)
    if not layers:
        raise ValueError("model: got no QAT layers, expected a model returned by prepare_qat")
    slots = module_slots(model)
    configs = {}
    for name, qat in layers.items():
        configs[name] = qat.config
        if name:
            replace_module(model, slots[name], qat.to_float())
        else:
            model = qat.to_float()
    # Module names are dotted identifiers and indices: no fnmatch wildcards, so each pattern is its layer alone.
    model = swap_to_quantized(model, layer_configs=configs, filter_fn=lambda module, name: name in configs,
                              progress=progress)
    refused = [f"{layer.name} ({layer.skip_reason})" for layer in model.quantization_report.skipped
               if layer.name in configs]
    if refused:
        raise ValueError(f"model: QAT layers could not be converted to the kernels: {', '.join(refused)}")
    return model
