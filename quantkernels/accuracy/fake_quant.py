"""Fake quantization: float tensors put on exactly the grid the kernels use, with straight-through gradients.

The weight grid is :func:`~quantkernels.formats.quantize_weight`'s, computed by the same functions, so a
fake-quantized weight equals ``quantize_weight(w, ...).dequantize()`` bit for bit. Activations follow the
kernels' dynamic int8 quantization: one scale per token (linear) or per image (conv).
"""

from __future__ import annotations

import contextlib
from typing import Dict, Tuple

import torch
from torch import nn

from .. import formats


def quantized_weight_values(w: torch.Tensor, bits: int, group_size, symmetric: bool) -> torch.Tensor:
    """``quantize_weight(w, ...).dequantize()`` in float32, without packing (no gradient)."""
    with torch.no_grad():
        n, k = w.shape[0], w[0].numel()
        groups = formats.weight_groups(w.detach(), bits, group_size)
        scale, zero = formats.group_params(groups, bits, symmetric)
        codes = formats.encode_groups(groups, scale, zero, bits, symmetric)
        # (code - zero) is a small integer and scale a float32, so this product rounds once, like dequantize().
        values = (codes - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
        return values.reshape(n, -1)[:, :k].reshape(w.shape)


def straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """``quantized`` in the forward pass, the identity's gradient to ``x`` in the backward pass.

    Written ``quantized + (x - x.detach())`` rather than ``x + (quantized - x).detach()``: the added term is
    exactly zero, so the forward value is ``quantized`` bit for bit.
    """
    return quantized.to(x.dtype) + (x - x.detach())


def fake_quantize_weight(w: torch.Tensor, bits: int, group_size, symmetric: bool) -> torch.Tensor:
    return straight_through(w, quantized_weight_values(w, bits, group_size, symmetric))


def fake_quantize_activation(x: torch.Tensor, dim_start: int) -> torch.Tensor:
    """Dynamic symmetric int8 with one scale per slice ``x[i0, ..., i_{dim_start-1}]``, straight through.

    ``dim_start = x.dim() - 1`` is per token (linear ops), ``1`` per image (conv ops).
    """
    with torch.no_grad():
        flat = x.detach().flatten(dim_start)
        xq, scale = formats.quantize_activation_per_token(flat)
        values = (xq * scale).reshape(x.shape)
    return straight_through(x, values)


def fake_quantize_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The kernels' dynamic int8 activations for ``module``: per token for a linear, per image (C, H, W) for a
    conv."""
    return fake_quantize_activation(x, x.dim() - 3 if isinstance(module, nn.Conv2d) else x.dim() - 1)


@contextlib.contextmanager
def simulated(modules: Dict[str, nn.Module], weights: Dict[str, Tuple[formats.QuantizedWeight, bool]]):
    """Runs the named float layers as their quantized versions would, restoring them afterwards.

    ``weights[name] = (quantized weight, act_int8)``: the layer computes with the dequantized weight and, with
    ``act_int8``, with its input fake-quantized per token (linear) or per image (conv), as the kernels do.
    Within the kernels' float tolerance this is the swapped model, without packing anything.
    """
    saved, handles = {}, []
    try:
        for name, (qw, act_int8) in weights.items():
            module = modules[name]
            saved[name] = module.weight.data
            module.weight.data = qw.dequantize(module.weight.dtype).to(module.weight.device)
            if act_int8:
                handles.append(module.register_forward_pre_hook(
                    lambda m, args: (fake_quantize_input(m, args[0]),) + args[1:]
                ))
        yield
    finally:
        for h in handles:
            h.remove()
        for name, data in saved.items():
            modules[name].weight.data = data
