"""Folding ``nn.BatchNorm2d`` into the ``nn.Conv2d`` that feeds it, for inference.

In eval mode a BatchNorm2d is a per-channel affine map, ``y = (x - mean) * gamma / sqrt(var + eps) + beta``; on
the output of a conv it folds into the conv's weight rows and bias, and the model no longer runs it (ResNet-50
with int8 activations: 0.77x the time a forward at batch 1, 0.86x at batch 8). Weight scales are per output
channel or per group within one, so the folded rows quantize as the unfolded ones did, scaled: no accuracy lost.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Dict, List, Tuple

import torch
import torch.fx
from torch import nn

from .modules import QuantizedConv2d, QuantizedModule
from .swap import module_slots, replace_module, shared_weight_owners


class FoldedBatchNorm2d(nn.Identity):
    """Where :func:`fold_batchnorm` folded a BatchNorm2d into the conv ``conv`` (by name): passes its input through.
    :func:`save_quantized` records it, so that :func:`load_quantized` folds the same places of a float model."""

    def __init__(self, conv: str):
        super().__init__()
        self.conv = conv

    def extra_repr(self) -> str:
        return f"folded into {self.conv!r}"


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Folds every ``nn.BatchNorm2d`` that only ever normalizes one ``nn.Conv2d``'s output into that conv (new
    weight and bias), in place, and puts a :class:`FoldedBatchNorm2d` in its place; returns the model.

    Pairs are found by tracing the model with ``torch.fx``: the conv's output goes to the BatchNorm and nowhere
    else, and each module is called once. A model that ``torch.fx`` cannot trace (control flow on values) has only
    the pairs that follow each other in an ``nn.Sequential`` folded, with a warning. Left as they are: BatchNorms
    without running statistics, and modules with hooks, parametrizations or subclassed ``forward``. The model's
    BatchNorms must be in eval mode (folding uses their running statistics): call ``model.eval()`` first.
    """
    fold_pairs(model, conv_batchnorm_pairs(model))
    return model


def fold_pairs(model: nn.Module, pairs: List[Tuple[str, str]]) -> None:
    """Folds the (conv name, BatchNorm name) pairs that :func:`conv_batchnorm_pairs` found."""
    slots = module_slots(model)
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            _fold_into(model.get_submodule(conv_name), model.get_submodule(bn_name))
            replace_module(model, slots[bn_name], FoldedBatchNorm2d(conv_name))


def fold_before_rounding(model: nn.Module, swap_kwargs: dict) -> None:
    """For the tools that take swap_to_quantized's arguments and round the weights before it runs (GPTQ, QAT):
    takes ``fold_batchnorm`` out of ``swap_kwargs`` and folds now, so that the weights rounded are the folded ones."""
    if check_fold_flag(swap_kwargs.pop("fold_batchnorm", False)):
        fold_batchnorm(model)


def check_fold_flag(fold) -> bool:
    if not isinstance(fold, bool):
        raise TypeError(f"fold_batchnorm: got {type(fold).__name__}, expected a bool")
    return fold


def folded_batchnorms(model: nn.Module) -> Dict[str, str]:
    """BatchNorm name -> the conv it was folded into, for each :class:`FoldedBatchNorm2d` in ``model``."""
    return {name: m.conv for name, m in model.named_modules() if isinstance(m, FoldedBatchNorm2d)}


def conv_batchnorm_pairs(model: nn.Module) -> List[Tuple[str, str]]:
    """(conv name, BatchNorm name) of the pairs :func:`fold_batchnorm` folds; checks that it may."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: got {type(model).__name__}, expected a torch.nn.Module")
    batchnorms = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if not batchnorms:
        return []  # nothing to trace for
    training = [name or "(model)" for name, m in batchnorms if m.training]
    if training:
        raise ValueError(f"model: BatchNorm2d {training[0]!r} is in training mode, expected eval mode (folding uses "
                         f"the running statistics, training normalizes by the batch's): call model.eval() first")
    tied = shared_weight_owners(model)
    slots = module_slots(model)  # a module held at two places has two
    try:
        graph = _LeafQuantizedTracer().trace(model)
    except Exception as e:  # torch.fx raises many kinds (TraceError, TypeError, ...) on untraceable code
        warnings.warn(f"fold_batchnorm: torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: {e}); "
                      f"folding only the BatchNorm2d that follow a Conv2d in an nn.Sequential", stacklevel=3)
        names = {id(m): name for name, m in model.named_modules()}
        candidates = [(names[id(seq[i])], names[id(seq[i + 1])])
                      for seq in model.modules() if type(seq) is nn.Sequential for i in range(len(seq) - 1)]
    else:
        calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
        candidates = [(node.args[0].target, node.target) for node in graph.nodes
                      if node.op == "call_module" and len(node.args) == 1 and not node.kwargs
                      and isinstance(node.args[0], torch.fx.Node) and node.args[0].op == "call_module"
                      and len(node.args[0].users) == 1
                      and calls[node.target] == 1 and calls[node.args[0].target] == 1]
    quantized = [b for c, b in candidates if isinstance(model.get_submodule(c), QuantizedConv2d)
                 and type(model.get_submodule(b)) is nn.BatchNorm2d]
    if quantized:
        warnings.warn(f"fold_batchnorm: BatchNorm2d {quantized} follow convs already quantized, whose stored weights "
                      f"it does not change; fold before swap_to_quantized", stacklevel=3)
    return [(c, b) for c, b in candidates if len(slots[c]) == 1 and len(slots[b]) == 1 and c not in tied
            and _foldable(model.get_submodule(c), model.get_submodule(b))]


class _LeafQuantizedTracer(torch.fx.Tracer):
    """torch.fx's tracer, with our quantized modules called rather than traced into (their forward checks its
    input's values)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QuantizedModule) or super().is_leaf_module(m, qualname)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.running_mean is not None
            and bn.num_features == conv.out_channels and conv.weight.dtype.is_floating_point
            and not any(m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m) for m in (conv, bn))
            and not torch.nn.utils.parametrize.is_parametrized(conv))


def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    # In float64: the folded weight is rounded once, to its own dtype.
    factor = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        factor = factor * bn.weight.double()
    bias = -bn.running_mean.double() if conv.bias is None else conv.bias.double() - bn.running_mean.double()
    bias = bias * factor + (0.0 if bn.bias is None else bn.bias.double())
    weight = conv.weight
    weight.copy_(weight.double() * factor.view(-1, 1, 1, 1))
    conv.bias = nn.Parameter(bias.to(weight.dtype), requires_grad=weight.requires_grad)
