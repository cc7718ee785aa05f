"""``swap_to_quantized``: replace a model's ``nn.Linear`` / ``nn.Conv2d`` layers by quantized ones, in place."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import warnings
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..config import QuantConfig
from ..formats import WEIGHT_DTYPES, QuantizedWeight
from .modules import QuantizedConv2d, QuantizedLinear, stored_nbytes

QUANTIZED_TYPES = {nn.Linear: QuantizedLinear, nn.Conv2d: QuantizedConv2d}
# With at least this many candidate layers, progress=None shows a bar (an LLM has hundreds; BERT-base 73).
PROGRESS_MIN_LAYERS = 100


class _Unset:
    def __repr__(self):
        return "<from config>"


_UNSET = _Unset()


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """One candidate layer: swapped (``skip_reason`` None) or skipped, with its weight bytes and SQNR."""

    name: str
    kind: str  # "Linear" or "Conv2d"
    config: Optional[QuantConfig]  # None when skipped
    skip_reason: Optional[str]
    bytes_before: int  # float weight + bias
    bytes_after: int  # stored weight + bias (== bytes_before when skipped)
    sqnr_db: Optional[float]  # of the quantized weight against the float weight; None when skipped

    @property
    def swapped(self) -> bool:
        return self.skip_reason is None


@dataclasses.dataclass(frozen=True)
class SwapReport:
    """What one :func:`swap_to_quantized` call did; ``str(report)`` is a table. The call sets it as
    ``model.quantization_report`` (a later call on the same model replaces it with its own)."""

    layers: Tuple[LayerReport, ...]
    model_bytes_before: int  # all parameters and buffers (shared tensors once)
    model_bytes_after: int
    folded: Tuple[Tuple[str, str], ...] = ()  # (conv, BatchNorm2d) pairs folded, by fold_batchnorm=True or before

    @property
    def swapped(self) -> List[LayerReport]:
        return [layer for layer in self.layers if layer.swapped]

    @property
    def skipped(self) -> List[LayerReport]:
        return [layer for layer in self.layers if not layer.swapped]

    @property
    def bytes_before(self) -> int:
        """Bytes of the swapped layers before quantization (weights and biases)."""
        return sum(layer.bytes_before for layer in self.swapped)

    @property
    def bytes_after(self) -> int:
        return sum(layer.bytes_after for layer in self.swapped)

    def __str__(self) -> str:
        lines = [
            f"swap_to_quantized: {len(self.swapped)} layers swapped, {len(self.skipped)} skipped; model "
            f"{_megabytes(self.model_bytes_before)} -> {_megabytes(self.model_bytes_after)} (swapped layers "
            f"{_megabytes(self.bytes_before)} -> {_megabytes(self.bytes_after)})"
        ]
        if self.folded:
            lines[0] += f"; {len(self.folded)} BatchNorm2d folded into their convs"
        folded_into = {conv: bn for conv, bn in self.folded}
        rows = [("layer", "type", "format", "before", "after", "SQNR dB", "note")]
        for layer in self.layers:
            rows.append((
                layer.name or "(model)",
                layer.kind,
                layer.config.describe() if layer.config else "float",
                _kilobytes(layer.bytes_before),
                _kilobytes(layer.bytes_after),
                f"{layer.sqnr_db:.1f}" if layer.sqnr_db is not None else "-",
                f"skipped: {layer.skip_reason}" if layer.skip_reason
                else f"{folded_into[layer.name]} folded in" if layer.name in folded_into else "",
            ))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            cells = [cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))]
            lines.append("  ".join(cells + [row[-1]]).rstrip())
        return "\n".join(lines)


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _kilobytes(n: int) -> str:
    return f"{n / 1e3:.1f} kB"


def model_nbytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, each shared tensor counted once."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def module_slots(model: nn.Module) -> Dict[str, List[Tuple[str, str]]]:
    """For each module (by its first name), every (parent name, attribute) that holds it: a module reused at two
    places in the tree is replaced at both."""
    first_name = {id(module): name for name, module in model.named_modules()}
    slots: Dict[str, List[Tuple[str, str]]] = {}
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if child is not None:
                name = first_name[id(child)]
                if (parent_name, attr) not in slots.setdefault(name, []):
                    slots[name].append((parent_name, attr))
    return slots


def replace_module(model: nn.Module, slots: List[Tuple[str, str]], new: nn.Module) -> None:
    for parent_name, attr in slots:
        setattr(model.get_submodule(parent_name), attr, new)


def swap_to_quantized(
    model: nn.Module,
    config: Optional[QuantConfig] = None,
    *,
    bits: Union[int, _Unset] = _UNSET,
    group_size: Union[Optional[int], _Unset] = _UNSET,
    symmetric: Union[bool, _Unset] = _UNSET,
    activations: Union[Optional[str], _Unset] = _UNSET,
    skip: Union[str, Iterable[str]] = (),
    layer_configs: Optional[Mapping[str, Optional[QuantConfig]]] = None,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    progress: Optional[bool] = None,
    weights: Optional[Mapping[str, QuantizedWeight]] = None,
    fold_batchnorm: bool = False,
) -> nn.Module:
    """Replaces ``model``'s ``nn.Linear`` and ``nn.Conv2d`` layers by :class:`QuantizedLinear` /
    :class:`QuantizedConv2d`, in place, one layer at a time, and returns the model.

    config: the default :class:`QuantConfig` (int8 weights per channel, float activations), or the shorthands
        ``bits``, ``group_size``, ``symmetric``, ``activations`` (its fields; not both).
    skip: ``fnmatch`` patterns on module names (``"classifier"``, ``"*.out_proj"``); ``*`` also matches dots.
    layer_configs: pattern -> QuantConfig (or None to keep the layer float); the first matching pattern wins.
    filter_fn: ``filter_fn(module, name)`` returning False keeps that layer float.
    progress: a tqdm bar; None shows one for models with many layers.
    weights: layer name -> a :class:`QuantizedWeight` rounded elsewhere (GPTQ, QAT, ...; see
        ``quantkernels.accuracy``) to install instead of rounding to nearest; it must be in the format the layer
        is swapped with (:func:`plan_swap` tells which), and every named layer must be swapped.
    fold_batchnorm: first fold each ``nn.BatchNorm2d`` into the conv that feeds it (:func:`fold_batchnorm`; the
        model must be in eval mode): the quantized model then skips them. For inference; no accuracy is lost.

    Never swapped, each listed in the report with its reason: layers inside ``nn.MultiheadAttention`` (it reads
    ``out_proj.weight`` directly instead of calling the layer), weights shared by several modules (tied
    embeddings), subclasses with their own ``forward``, layers with hooks or parametrizations, weights that
    cannot be quantized (dtype, NaN/Inf, meta device) and layers whose stored format would not be smaller than
    the float weight (tiny K with a large group). The :class:`SwapReport` is set as ``model.quantization_report``.
    """
    from .fold import check_fold_flag, conv_batchnorm_pairs, fold_pairs, folded_batchnorms  # fold.py uses this module

    weights = dict(weights or {})
    plan, skip, layer_configs = _plan(model, config, bits=bits, group_size=group_size, symmetric=symmetric,
                                      activations=activations, skip=skip, layer_configs=layer_configs,
                                      filter_fn=filter_fn)
    unswapped = sorted(set(weights) - {name for name, (_, layer_config) in plan.items() if layer_config is not None})
    if unswapped:
        raise ValueError(f"weights: got weights for {unswapped}, expected only layers that are swapped (see plan_swap)")
    pairs = conv_batchnorm_pairs(model) if check_fold_flag(fold_batchnorm) else []
    if pairs:
        rounded = sorted({conv for conv, _ in pairs} & set(weights))
        if rounded:
            raise ValueError(f"weights: got weights for {rounded}, which fold_batchnorm=True changes by folding a "
                             f"BatchNorm2d into them; fold first (quantkernels.fold_batchnorm), then round")
    model_bytes_before = model_nbytes(model)
    fold_pairs(model, pairs)
    # Only names are kept across the loop: holding the float modules would keep their weights alive.
    slots = module_slots(model)
    show = len(plan) >= PROGRESS_MIN_LAYERS if progress is None else bool(progress)
    layers = []
    with torch.no_grad():
        for name in _progress(list(plan), show):
            module = model.get_submodule(name)
            kind = next(t for t in QUANTIZED_TYPES if isinstance(module, t))
            reason, layer_config = plan[name]
            before = _float_nbytes(module)
            if reason:
                layers.append(LayerReport(name, kind.__name__, None, reason, before, before, None))
                continue
            if name in weights:
                quantized, sqnr = QUANTIZED_TYPES[kind].from_quantized_with_sqnr(module, weights.pop(name),
                                                                                 layer_config)
            else:
                quantized, sqnr = QUANTIZED_TYPES[kind].from_float_with_sqnr(module, layer_config)
            del module  # once replaced below, nothing holds the float layer: its weight is freed before the next
            if name:
                replace_module(model, slots[name], quantized)
            else:
                model = quantized
            layers.append(LayerReport(name, kind.__name__, layer_config, None, before, quantized.nbytes(), sqnr))

    names = list(plan)
    for pattern in skip + list(layer_configs):
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            warnings.warn(f"swap_to_quantized: pattern {pattern!r} matched no Linear or Conv2d layer", stacklevel=2)
    folded = tuple((conv, bn) for bn, conv in folded_batchnorms(model).items())
    model.quantization_report = SwapReport(tuple(layers), model_bytes_before, model_nbytes(model), folded)
    return model


def plan_swap(
    model: nn.Module,
    config: Optional[QuantConfig] = None,
    *,
    bits: Union[int, _Unset] = _UNSET,
    group_size: Union[Optional[int], _Unset] = _UNSET,
    symmetric: Union[bool, _Unset] = _UNSET,
    activations: Union[Optional[str], _Unset] = _UNSET,
    skip: Union[str, Iterable[str]] = (),
    layer_configs: Optional[Mapping[str, Optional[QuantConfig]]] = None,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
) -> Dict[str, Optional[QuantConfig]]:
    """What :func:`swap_to_quantized` would do with the same arguments, without changing the model: each
    ``nn.Linear`` / ``nn.Conv2d`` by name, with the config it would be swapped with (None: it stays float).

    For tools that prepare layers before the swap: calibration-based rounding, QAT, sensitivity analysis.
    """
    plan, _, _ = _plan(model, config, bits=bits, group_size=group_size, symmetric=symmetric, activations=activations,
                       skip=skip, layer_configs=layer_configs, filter_fn=filter_fn)
    return {name: layer_config for name, (_, layer_config) in plan.items()}


def _plan(model, config, *, bits, group_size, symmetric, activations, skip, layer_configs, filter_fn):
    """Checks the arguments; returns ({name: (skip reason or None, config or None)}, skip list, layer_configs)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: got {type(model).__name__}, expected a torch.nn.Module")
    default = _default_config(config, bits=bits, group_size=group_size, symmetric=symmetric, activations=activations)
    skip = [skip] if isinstance(skip, str) else list(skip)
    layer_configs = dict(layer_configs or {})
    for pattern, value in layer_configs.items():
        if value is not None and not isinstance(value, QuantConfig):
            raise TypeError(f"layer_configs[{pattern!r}]: got {type(value).__name__}, expected a QuantConfig or None")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn: got {type(filter_fn).__name__}, expected a callable (module, name) -> bool")
    shared_with = shared_weight_owners(model)
    inside_attention = {f"{name}.{attr}".lstrip(".") for name, m in model.named_modules()
                        if isinstance(m, nn.MultiheadAttention) for attr in m._modules}
    plan = {}
    for name, module in model.named_modules():
        if isinstance(module, tuple(QUANTIZED_TYPES)):
            kind = next(t for t in QUANTIZED_TYPES if isinstance(module, t))
            plan[name] = _skip_reason(module, name, kind, default, skip, layer_configs, filter_fn,
                                      name in inside_attention, shared_with.get(name, []))
    return plan, skip, layer_configs


def _default_config(config, **fields) -> QuantConfig:
    given = {k: v for k, v in fields.items() if v is not _UNSET}
    if config is not None:
        if given:
            raise TypeError(f"pass either config or the shorthands {sorted(given)}, not both")
        if not isinstance(config, QuantConfig):
            raise TypeError(f"config: got {type(config).__name__}, expected a quantkernels.QuantConfig")
        return config
    return QuantConfig(**given)


def shared_weight_owners(model: nn.Module) -> Dict[str, List[str]]:
    """Module name -> the other modules holding the same weight Parameter (tied weights)."""
    owners: Dict[int, List[str]] = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is not None:
            owners.setdefault(id(weight), []).append(name)
    return {name: [other for other in names if other != name]
            for names in owners.values() if len(names) > 1 for name in names}


def _skip_reason(module, name, kind, default, skip, layer_configs, filter_fn, in_attention,
                 shared_with) -> Tuple[Optional[str], Optional[QuantConfig]]:
    """Why ``module`` stays float (None if it is swapped), and the config it is swapped with."""
    if in_attention:
        return "inside nn.MultiheadAttention, which reads its weight directly instead of calling it", None
    for pattern in skip:
        if fnmatch.fnmatchcase(name, pattern):
            return f"matches skip pattern {pattern!r}", None
    if type(module).forward is not kind.forward:
        return f"{type(module).__name__} overrides {kind.__name__}.forward", None
    if "forward" in vars(module):
        return "forward was replaced on the instance (a wrapper or hook library?)", None
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
        return "has hooks registered, which the quantized module would not carry", None
    if parametrize.is_parametrized(module):
        return "its weight is parametrized", None
    if shared_with:
        return f"weight is shared with {', '.join(shared_with)} (tied)", None
    weight = module.weight
    if weight.dtype not in WEIGHT_DTYPES:
        return f"weight dtype {weight.dtype} (quantization reads float32, bfloat16, float16)", None
    if weight.is_meta or weight.numel() == 0:
        return "weight has no values (meta device or empty)", None
    if not all(torch.isfinite(extreme) for extreme in torch.aminmax(weight)):  # NaN propagates; no temporary copy
        return "weight contains NaN or Inf", None
    if filter_fn is not None and not filter_fn(module, name):
        return "filter_fn returned False", None
    config = default
    for pattern, value in layer_configs.items():
        if fnmatch.fnmatchcase(name, pattern):
            if value is None:
                return f"layer_configs[{pattern!r}] is None", None
            config = value
            break
    stored, dense = stored_nbytes(weight.shape, config), weight.numel() * weight.element_size()
    if stored >= dense:
        return (f"{config.describe()} would take {stored} B against {dense} B float "
                f"(in_features {math.prod(weight.shape[1:])} is small for its group)"), None
    return None, config


def _float_nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (module.weight, module.bias) if t is not None)


def _progress(names: List[str], show: bool):
    if not show:
        return names
    from tqdm.auto import tqdm

    return tqdm(names, desc="swap_to_quantized", unit="layer")
