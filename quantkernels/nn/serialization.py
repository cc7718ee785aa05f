"""Saving and loading quantized models as safetensors.

The file holds the model's state (the stored weight bytes of docs/FORMATS.md, never an in-memory layout) and,
in its metadata, each quantized layer's module type and :class:`QuantConfig`. :func:`load_quantized` uses that
to rebuild the quantized layers of a freshly built float model without quantizing anything (and to mark the
BatchNorms folded into convs, see fold.py), then loads strictly: a missing or unexpected key, a shape, dtype or
format version that does not fit raises an error naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Union

from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from ..config import QuantConfig
from ..formats import FORMAT_VERSION
from .fold import FoldedBatchNorm2d, folded_batchnorms
from .modules import QuantizedConv2d, QuantizedLinear, QuantizedModule
from .swap import module_slots, replace_module

LAYERS_KEY = "quantkernels.layers"
VERSION_KEY = "quantkernels.format_version"
FOLDED_KEY = "quantkernels.folded_batchnorm"
MODULE_TYPES = {cls.__name__: cls for cls in (QuantizedLinear, QuantizedConv2d)}


def save_quantized(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Writes ``model``'s state and its quantized layers' configs to a safetensors file."""
    layers = {name: {"type": type(m).__name__, **dataclasses.asdict(m.config)}
              for name, m in model.named_modules() if isinstance(m, QuantizedModule)}
    if not layers:
        raise ValueError("model: has no quantized layers, expected a model returned by swap_to_quantized")
    # save_model (not save_file) writes tensors shared by several keys, e.g. tied embeddings, once.
    metadata = {LAYERS_KEY: json.dumps(layers), VERSION_KEY: str(FORMAT_VERSION)}
    folded = folded_batchnorms(model)
    if folded:
        metadata[FOLDED_KEY] = json.dumps(folded)
    save_model(model, os.fspath(path), metadata=metadata)


def load_quantized(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Loads a :func:`save_quantized` file into ``model`` (the float architecture, or one already swapped),
    swapping in the file's quantized layers first; returns the model."""
    path = os.fspath(path)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    if LAYERS_KEY not in metadata:
        raise ValueError(f"{path}: has no {LAYERS_KEY!r} metadata, expected a file written by save_quantized")
    if metadata.get(VERSION_KEY) != str(FORMAT_VERSION):
        raise ValueError(f"{path}: stored format version {metadata.get(VERSION_KEY)!r}, expected {FORMAT_VERSION} "
                         f"(the version this quantkernels reads)")
    slots = module_slots(model)
    for bn_name, conv_name in json.loads(metadata.get(FOLDED_KEY, "{}")).items():
        _mark_folded(model, slots, bn_name, conv_name, path)
    for name, entry in json.loads(metadata[LAYERS_KEY]).items():
        entry = dict(entry)
        cls = MODULE_TYPES.get(entry.pop("type"))
        if cls is None:
            raise ValueError(f"{path}: layer {name!r} has an unknown module type, expected one of {list(MODULE_TYPES)}")
        config = QuantConfig(**entry)
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: holds layer {name!r}, which the model does not have") from None
        if isinstance(module, cls) and module.config == config:
            continue
        if isinstance(module, cls):
            raise ValueError(f"{name}: the file holds {config.describe()} weights, the model's layer is already "
                             f"quantized as {module.config.describe()}; load into the float model instead")
        if not isinstance(module, cls.float_type):
            raise TypeError(f"{name}: the file holds a quantized {cls.float_type.__name__}, the model has "
                            f"{type(module).__name__}")
        skeleton = cls.empty_like(module, config)
        if name:
            replace_module(model, slots[name], skeleton)
        else:
            model = skeleton
    load_model(model, path, strict=True)
    return model


def _mark_folded(model: nn.Module, slots, bn_name: str, conv_name: str, path: str) -> None:
    """Gives ``model`` the shape fold_batchnorm left: the BatchNorm replaced, the conv with a bias (the file's)."""
    try:
        bn, conv = model.get_submodule(bn_name), model.get_submodule(conv_name)
    except AttributeError:
        raise ValueError(f"{path}: holds BatchNorm2d {bn_name!r} folded into {conv_name!r}, which the model does "
                         f"not have") from None
    if isinstance(bn, FoldedBatchNorm2d):
        return
    if not isinstance(bn, nn.BatchNorm2d) or not isinstance(conv, (nn.Conv2d, QuantizedConv2d)):
        raise TypeError(f"{bn_name}: the file folded a BatchNorm2d into the Conv2d {conv_name!r}, the model has "
                        f"{type(bn).__name__} and {type(conv).__name__} there")
    if conv.bias is None and isinstance(conv, QuantizedConv2d):
        raise ValueError(f"{conv_name}: the file folded BatchNorm2d {bn_name!r} into it, the model's quantized layer "
                         f"has no bias to hold that; load into the float model instead")
    if conv.bias is None:
        conv.bias = nn.Parameter(conv.weight.new_zeros(conv.out_channels))
    replace_module(model, slots[bn_name], FoldedBatchNorm2d(conv_name))
