"""Drop-in quantized replacements for ``nn.Linear`` and ``nn.Conv2d``.

Each module holds its weight in the stored format of docs/FORMATS.md as buffers (``qdata``, ``scale``,
``zero_point`` for asymmetric int4, ``format_version``) plus a float ``bias``, and calls the ``torch.ops.quant``
ops through :func:`quantkernels.ops.linear` / :func:`quantkernels.ops.conv2d`. The buffers are exactly the
saved state; loading a state that does not fit the module (another format, shape, dtype or version) raises an
error naming the key instead of producing a silently wrong model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from .. import ops
from ..config import QuantConfig
from ..formats import FORMAT_VERSION, QuantizedWeight

# Rows are quantized in blocks of about this many weights. Quantizing and measuring the error takes ~50 bytes
# of temporaries per weight (a float32 copy, rounding, the float64 dequantization for the SQNR), so a block
# costs ~3 MB whatever the layer size: swapping a model never needs much more memory than the model itself.
BLOCK_ELEMENTS = 1 << 16

STORED_TENSORS = ("qdata", "scale", "zero_point")


def sqnr_db(signal_energy: float, noise_energy: float) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum w^2 / sum (w - w_q)^2)``; inf for an exact weight."""
    if noise_energy == 0.0:
        return math.inf
    return 10.0 * math.log10(signal_energy / noise_energy) if signal_energy > 0 else -math.inf


def quantize_with_sqnr(weight: torch.Tensor, config: QuantConfig,
                       out: Optional[QuantizedWeight] = None) -> Tuple[QuantizedWeight, float]:
    """``config.quantize(weight)`` computed in blocks of rows, with the SQNR in dB of the result against ``weight``.

    Scale groups run along a row, so row blocks quantize independently and fill the whole-tensor result
    exactly. The result is allocated once up front (or is ``out``, e.g. a module's zero buffers of the right
    layout): blocks' temporaries then reuse the same freed memory instead of fragmenting the heap around
    pieces of the result (see :data:`BLOCK_ELEMENTS`).
    """
    weight = weight.detach()
    stored = _zero_stored_weight(weight.shape, config, weight.device) if out is None else out
    signal, noise = 0.0, 0.0
    for rows in _row_blocks(weight):
        block = config.quantize(weight[rows])
        for name in STORED_TENSORS:
            if getattr(block, name) is not None:
                getattr(stored, name)[rows] = getattr(block, name)
        block_signal, block_noise = _error_energies(weight[rows], block)
        signal, noise = signal + block_signal, noise + block_noise
    return stored, sqnr_db(signal, noise)


def weight_sqnr_db(weight: torch.Tensor, stored: QuantizedWeight) -> float:
    """SQNR in dB of ``stored`` (rounded by any method) against the float ``weight``, a block of rows at a time."""
    signal, noise = 0.0, 0.0
    for rows in _row_blocks(weight):
        zero_point = None if stored.zero_point is None else stored.zero_point[rows]
        block = dataclasses.replace(stored, shape=tuple(weight[rows].shape), qdata=stored.qdata[rows],
                                    scale=stored.scale[rows], zero_point=zero_point)
        block_signal, block_noise = _error_energies(weight[rows].detach(), block)
        signal, noise = signal + block_signal, noise + block_noise
    return sqnr_db(signal, noise)


def _row_blocks(weight: torch.Tensor):
    """Slices of about :data:`BLOCK_ELEMENTS` weights, whole rows each."""
    rows = max(1, BLOCK_ELEMENTS // max(1, weight[0].numel()))
    return [slice(start, start + rows) for start in range(0, weight.shape[0], rows)]


def _error_energies(exact: torch.Tensor, block: QuantizedWeight) -> Tuple[float, float]:
    """(sum of exact^2, sum of (exact - dequantized)^2) in float64."""
    exact64 = exact.to(torch.float64)
    dequantized = block.dequantize(torch.float64).to(exact64.device)
    return exact64.square().sum().item(), (exact64 - dequantized).square().sum().item()


def _zero_stored_weight(shape, config: QuantConfig, device) -> QuantizedWeight:
    """An all-zero weight of ``shape`` in ``config``'s stored layout.

    The per-row layout comes from quantizing one zero row, so the shapes and dtypes have one source: formats.py.
    """
    row = config.quantize(torch.zeros(1, *shape[1:]))

    def rows_of(t):
        return None if t is None else torch.zeros((shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=device)

    return dataclasses.replace(
        row, shape=tuple(shape), qdata=rows_of(row.qdata), scale=rows_of(row.scale), zero_point=rows_of(row.zero_point)
    )


def stored_nbytes(shape, config: QuantConfig) -> int:
    """Bytes of a weight of ``shape`` in ``config``'s stored format (codes, scales, zero points)."""
    return config.quantize(torch.zeros(1, *shape[1:])).nbytes() * shape[0]


class QuantizedModule(nn.Module):
    """What :class:`QuantizedLinear` and :class:`QuantizedConv2d` share: the stored weight as buffers, its
    validation on load, and float32 scales that survive ``.to(dtype)``."""

    float_type: type = nn.Module

    def _init_stored(self, weight_shape, config: Optional[QuantConfig], has_bias: bool, device, dtype) -> None:
        config = QuantConfig() if config is None else config
        if not isinstance(config, QuantConfig):
            raise TypeError(f"config: got {type(config).__name__}, expected a quantkernels.QuantConfig")
        self.config = config
        self.weight_shape = tuple(weight_shape)
        zero = _zero_stored_weight(self.weight_shape, config, device)
        self.register_buffer("qdata", zero.qdata)
        self.register_buffer("scale", zero.scale)
        self.register_buffer("zero_point", zero.zero_point)  # None (and not in the state) unless asymmetric int4
        bias_dtype = torch.float32 if dtype is None else dtype
        bias = torch.zeros(weight_shape[0], dtype=bias_dtype, device=device) if has_bias else None
        self.register_buffer("bias", bias)
        self.register_buffer("format_version", torch.tensor(FORMAT_VERSION, device=device))

    # -- the stored weight -------------------------------------------------------------------------------------
    def quantized_weight(self) -> QuantizedWeight:
        """The weight as a :class:`~quantkernels.formats.QuantizedWeight` viewing this module's buffers."""
        c = self.config
        return QuantizedWeight(c.bits, c.group_size, c.symmetric, self.weight_shape, self.qdata, self.scale,
                               self.zero_point)

    def set_quantized_weight(self, weight: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> None:
        """Installs a weight quantized elsewhere (e.g. by GPTQ); it must match this module's config and shape."""
        c = self.config
        if (weight.bits, weight.group_size, weight.symmetric) != (c.bits, c.group_size, c.symmetric):
            got = QuantConfig(weight.bits, weight.group_size, weight.symmetric).describe()
            raise ValueError(f"weight: got format {got}, expected {c.describe()} like this module's config")
        if weight.format_version != FORMAT_VERSION:
            raise ValueError(f"weight: got format_version {weight.format_version}, expected {FORMAT_VERSION}")
        if tuple(weight.shape) != self.weight_shape:
            raise ValueError(f"weight: got shape {tuple(weight.shape)}, expected {self.weight_shape}")
        for name in STORED_TENSORS:
            problem = self._stored_tensor_problem(name, getattr(weight, name))
            if problem:
                raise ValueError(f"weight.{name}: {problem}")
        if (bias is None) != (self.bias is None) or (
                bias is not None and (bias.shape != self.bias.shape or not bias.dtype.is_floating_point)):
            got = "None" if bias is None else f"{bias.dtype} {tuple(bias.shape)}"
            want = "None" if self.bias is None else f"a float tensor of shape {tuple(self.bias.shape)}"
            raise ValueError(f"bias: got {got}, expected {want}")
        self.qdata, self.scale, self.zero_point = weight.qdata, weight.scale, weight.zero_point
        if bias is not None:
            self.bias = bias.detach().clone()
        self._weight_loaded()

    def _weight_loaded(self) -> None:
        """Called whenever the stored weight is set, loaded, moved or copied: where a kernel lays it out ahead."""

    def __setstate__(self, state):
        # copy.deepcopy and pickle rebuild a module through here, with new weight tensors.
        super().__setstate__(state)
        self._weight_loaded()

    def _stored_tensor_problem(self, name: str, value) -> Optional[str]:
        current = getattr(self, name)
        if current is None and value is None:
            return None
        if current is None:
            return f"got a tensor, expected none for {self.config.describe()} weights"
        if value is None:
            return f"missing, expected {current.dtype} {tuple(current.shape)} for {self.config.describe()} weights"
        if value.dtype != current.dtype or value.shape != current.shape:
            return (f"got {value.dtype} {tuple(value.shape)}, expected {current.dtype} {tuple(current.shape)} for "
                    f"{self.config.describe()} weights of shape {self.weight_shape} (saved with another QuantConfig "
                    f"or layer shape?)")
        return None

    def nbytes(self) -> int:
        """Bytes of the weight's stored tensors and the bias."""
        return sum(t.numel() * t.element_size() for t in (self.qdata, self.scale, self.zero_point, self.bias)
                   if t is not None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # torch would cast a mismatched dtype silently and, with strict=False, skip a missing zero point or bias:
        # either gives a wrong model. Once any of this module's keys is in the state, all must be and must fit.
        names = STORED_TENSORS + ("bias", "format_version")
        if any(prefix + name in state_dict for name in names + ("weight",)):
            errors_before = len(error_msgs)
            if prefix + "weight" in state_dict:
                error_msgs.append(f"{prefix}weight: got a float weight, expected the stored tensors {STORED_TENSORS} "
                                  f"of a quantized layer (load float states into the float model, then swap)")
            version = state_dict.get(prefix + "format_version")
            if version is not None and (version.numel() != 1 or int(version) != FORMAT_VERSION):
                error_msgs.append(f"{prefix}format_version: got {version.tolist()}, expected {FORMAT_VERSION} "
                                  f"(this quantkernels reads stored format version {FORMAT_VERSION} only)")
            for name in names:
                key, current = prefix + name, getattr(self, name)
                value = state_dict.get(key)
                if name in STORED_TENSORS or (value is None) != (current is None):
                    problem = self._stored_tensor_problem(name, value)
                    if problem:
                        error_msgs.append(f"{key}: {problem}")
            if len(error_msgs) > errors_before:
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._weight_loaded()

    def _apply(self, fn, recurse=True):
        # .to(dtype), .half() and friends convert every floating buffer; the stored scales are float32 by format,
        # so they only follow the module's device.
        scale = self.scale
        super()._apply(fn, recurse)
        if self.scale.dtype != scale.dtype:
            self.scale = scale.to(self.scale.device)
        self._weight_loaded()
        return self

    def _format_repr(self) -> str:
        activations = "int8 per token" if self.config.act_int8 else "float"
        return f"weights={self.config.describe()}, activations={activations}, format_version={FORMAT_VERSION}"

    @classmethod
    def empty_like(cls, module: nn.Module, config: Optional[QuantConfig] = None) -> "QuantizedModule":
        """A zero-weight module with ``module``'s geometry, device and bias dtype, to be filled by a state dict."""
        raise NotImplementedError

    @classmethod
    def from_float(cls, module: nn.Module, config: Optional[QuantConfig] = None) -> "QuantizedModule":
        """``module``'s weight quantized to nearest in ``config`` (default: int8 per channel, float activations)."""
        return cls.from_float_with_sqnr(module, config)[0]

    @classmethod
    def from_float_with_sqnr(cls, module: nn.Module, config: Optional[QuantConfig] = None):
        """Like :meth:`from_float`, also returning the weight's SQNR in dB against the float weight."""
        if not isinstance(module, cls.float_type):
            raise TypeError(f"module: got {type(module).__name__}, expected an nn.{cls.float_type.__name__}")
        quantized = cls.empty_like(module, config)
        with torch.no_grad():
            weight, sqnr = quantize_with_sqnr(module.weight, quantized.config, out=quantized.quantized_weight())
            quantized.set_quantized_weight(weight, module.bias)
        return quantized, sqnr

    @classmethod
    def from_quantized_with_sqnr(cls, module: nn.Module, weight: QuantizedWeight,
                                 config: Optional[QuantConfig] = None):
        """``module`` with ``weight``, rounded elsewhere (e.g. by GPTQ) in ``config``'s format, and the SQNR in dB
        of that weight against ``module``'s float weight."""
        if not isinstance(module, cls.float_type):
            raise TypeError(f"module: got {type(module).__name__}, expected an nn.{cls.float_type.__name__}")
        quantized = cls.empty_like(module, config)
        with torch.no_grad():
            quantized.set_quantized_weight(weight, module.bias)
        return quantized, weight_sqnr_db(module.weight, weight)


class QuantizedLinear(QuantizedModule):
    """``nn.Linear`` with a quantized weight: ``y = x W^T + b`` through ``torch.ops.quant.linear_*``."""

    float_type = nn.Linear

    def __init__(self, in_features: int, out_features: int, bias: bool = True, config: Optional[QuantConfig] = None,
                 *, device=None, dtype=None):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: got {value!r}, expected a positive int")
        self.in_features, self.out_features = in_features, out_features
        self._init_stored((out_features, in_features), config, bias, device, dtype)

    @classmethod
    def empty_like(cls, module: nn.Linear, config: Optional[QuantConfig] = None) -> "QuantizedLinear":
        bias = module.bias
        return cls(module.in_features, module.out_features, bias is not None, config, device=module.weight.device,
                   dtype=None if bias is None else bias.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops.check_activation(x)
        if x.shape[-1] != self.in_features:
            # The kernel cannot tell: K is hidden inside the padded stored rows.
            raise ValueError(f"x: got shape {tuple(x.shape)}, expected (..., {self.in_features}) for {self}")
        return ops.linear(x, self.quantized_weight(), self.bias, act_int8=self.config.act_int8)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self._format_repr()}")


PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _conv_input_padding(padding, kernel_size, dilation, padding_mode):
    """How to pad like ``nn.Conv2d``: (``F.pad`` amounts or None, the symmetric padding passed to the op).

    ``padding='same'`` needs ``dilation * (kernel - 1)`` in total per dim; torch puts the odd element on the
    right/bottom, which the op's symmetric padding cannot express, so the input is padded first. Other
    padding modes also pad the input (as nn.Conv2d does) and run the op unpadded.
    """
    if isinstance(padding, str):
        totals = [d * (k - 1) if padding == "same" else 0 for d, k in zip(dilation, kernel_size)]
        sides = [(t // 2, t - t // 2) for t in totals]
    else:
        sides = [(p, p) for p in padding]
    if padding_mode == "zeros" and all(lo == hi for lo, hi in sides):
        return None, tuple(lo for lo, _ in sides)
    (top, bottom), (left, right) = sides
    return (left, right, top, bottom), (0, 0)  # F.pad lists the last dim first


class QuantizedConv2d(QuantizedModule):
    """``nn.Conv2d`` with a quantized weight through ``torch.ops.quant.conv2d_*``; int8 activations are
    quantized per image."""

    float_type = nn.Conv2d

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding: Union[str, int, tuple] = 0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 config: Optional[QuantConfig] = None, *, device=None, dtype=None):
        super().__init__()
        if not isinstance(groups, int) or groups <= 0 or in_channels % groups or out_channels % groups:
            raise ValueError(f"groups: got {groups!r}, expected a positive divisor of in_channels={in_channels} and "
                             f"out_channels={out_channels}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode: got {padding_mode!r}, expected one of {PADDING_MODES}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding: got {padding!r}, expected 'same', 'valid' or ints")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError(f"padding: got 'same' with stride {self.stride}, expected stride 1 (as nn.Conv2d)")
            self.padding = padding
        else:
            self.padding = _pair(padding)
        self.padding_mode = padding_mode
        self._input_padding, self._op_padding = _conv_input_padding(self.padding, self.kernel_size, self.dilation,
                                                                    padding_mode)
        self._init_stored((out_channels, in_channels // groups) + self.kernel_size, config, bias, device, dtype)

    @classmethod
    def empty_like(cls, module: nn.Conv2d, config: Optional[QuantConfig] = None) -> "QuantizedConv2d":
        bias = module.bias
        return cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                   module.dilation, module.groups, bias is not None, module.padding_mode, config,
                   device=module.weight.device, dtype=None if bias is None else bias.dtype)

    def _weight_loaded(self) -> None:
        # Prepared now rather than by the first call (which would do it otherwise): see ops.prepack_conv2d.
        ops.prepack_conv2d(self.quantized_weight(), self.stride, self._op_padding, self.groups, self.config.act_int8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops.check_activation(x)
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(f"x: got shape {tuple(x.shape)}, expected (batch, {self.in_channels}, height, width) or "
                             f"({self.in_channels}, height, width) for {self}")
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if self._input_padding is not None:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._input_padding, mode=mode)
        y = ops.conv2d(x, self.quantized_weight(), self.bias, self.stride, self._op_padding, self.dilation,
                       self.groups, act_int8=self.config.act_int8)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding!r}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}")
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return f"{s}, {self._format_repr()}"
