"""Calibration: run sample batches through a model and record what each layer's input looks like.

Two products:

* :func:`calibrate` gives each layer's activation range (min/max, a percentile, or the MSE-optimal clipping)
  and the static int8 scale it implies, as :class:`ActivationRange`. The kernels quantize activations
  dynamically (one scale per token or image, computed at run time), so nothing consumes a static scale yet:
  it is for inspection, for simulating static quantization (:meth:`ActivationRange.fake_quantize`) and for
  exporting to runtimes that want one.
* :func:`collect_hessians` gives each layer's input Gram matrix ``X^T X``: what GPTQ and the
  importance-weighted scale search (:mod:`quantkernels.accuracy.rounding`) need. This is where calibration
  pays off with these kernels.

A batch is fed to the model as ``model(*batch)`` when it is a tuple or list and as ``model(batch)``
otherwise (a tensor, or the feature dict a ``SentenceTransformer`` takes); ``run_fn(model, batch)`` overrides
that (e.g. ``lambda m, b: m(**b)`` for a Hugging Face model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Dict, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..formats import ACT_INT8_QMAX
from ..nn.modules import _conv_input_padding

#: Histogram resolution of the percentile and MSE observers: 2048 bins over [0, absmax] resolve a clipping
#: threshold to 0.05% of the range, finer than the 1/127 step of the int8 grid it sets.
HISTOGRAM_BINS = 2048


def default_run(model: nn.Module, batch):
    return model(*batch) if isinstance(batch, (tuple, list)) else model(batch)


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """``model.eval()`` and ``torch.no_grad()`` for the duration, restoring every module's training flag."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


def run_batches(model: nn.Module, batches: Iterable, run_fn: Optional[Callable] = None) -> list:
    """Runs every batch through ``model`` in eval mode without gradients; returns the outputs."""
    run = run_fn or default_run
    with evaluating(model):
        return [run(model, b) for b in batches]


def first_tensor(args) -> torch.Tensor:
    x = args[0] if isinstance(args, tuple) else args
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"layer input: got {type(x).__name__}, expected a tensor as the first argument")
    return x


@contextlib.contextmanager
def input_hooks(modules: Dict[str, nn.Module], fn: Callable):
    """Calls ``fn(name, module, x)`` with the input tensor of each named module on every call."""
    handles = [
        m.register_forward_pre_hook(lambda mod, args, name=name: fn(name, mod, first_tensor(args)))
        for name, m in modules.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------- observers


class MinMaxObserver:
    """Clips at the largest magnitude seen: no input is ever clipped, small ones lose resolution."""

    def __init__(self):
        self.min = math.inf
        self.max = -math.inf

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        self.min = min(self.min, x.min().item())
        self.max = max(self.max, x.max().item())

    def clip(self) -> float:
        return max(abs(self.min), abs(self.max))


class HistogramObserver(MinMaxObserver):
    """Keeps a histogram of ``|x|`` over [0, absmax]; when the absmax grows, the old counts are re-binned."""

    def __init__(self, bins: int = HISTOGRAM_BINS):
        super().__init__()
        self.bins = bins
        self.counts = torch.zeros(bins, dtype=torch.float64)
        self.top = 0.0

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        a = x.detach().abs().flatten().to(torch.float64)
        top = a.max().item()
        if not math.isfinite(top):
            raise ValueError("layer input: contains NaN or Inf; calibration needs finite activations")
        if top > self.top:
            self._rebin(top)
        if self.top > 0:
            idx = (a * (self.bins / self.top)).long().clamp(max=self.bins - 1)
            self.counts += torch.bincount(idx, minlength=self.bins).to(torch.float64)

    def _rebin(self, top: float) -> None:
        # Each old bin's count moves to the new bin holding its centre; the new range doubles past the old one
        # so that a slowly growing maximum re-bins O(log range) times, not once per batch.
        new_top = max(top, 2.0 * self.top)
        if self.top > 0:
            centres = (torch.arange(self.bins, dtype=torch.float64) + 0.5) * (self.top / self.bins)
            idx = (centres * (self.bins / new_top)).long().clamp(max=self.bins - 1)
            self.counts = torch.zeros(self.bins, dtype=torch.float64).index_add_(0, idx, self.counts)
        self.top = new_top

    def centres(self) -> torch.Tensor:
        return (torch.arange(self.bins, dtype=torch.float64) + 0.5) * (self.top / self.bins)


class PercentileObserver(HistogramObserver):
    """Clips at a percentile of ``|x|`` (99.99 by default): the rare outliers beyond it saturate."""

    def __init__(self, percentile: float = 99.99, bins: int = HISTOGRAM_BINS):
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile: got {percentile}, expected a number in (0, 100]")
        super().__init__(bins)
        self.percentile = percentile

    def clip(self) -> float:
        total = self.counts.sum()
        if total == 0:
            return 0.0
        cdf = self.counts.cumsum(0) / total
        i = int(torch.searchsorted(cdf, torch.tensor(self.percentile / 100, dtype=torch.float64)).clamp(max=self.bins - 1))
        return min((i + 1) * self.top / self.bins, super().clip())


class MSEObserver(HistogramObserver):
    """Clips where symmetric int8 quantization of the observed values has the least squared error.

    Each threshold ``c`` (a bin edge) quantizes every bin's centre on the grid of step ``c / 127``, saturating
    beyond ``c``; the error is summed over the histogram's counts and minimized over the edges.
    """

    def clip(self) -> float:
        if self.counts.sum() == 0:
            return 0.0
        x = self.centres().unsqueeze(0)  # (1, bin)
        edges = torch.arange(1, self.bins + 1, dtype=torch.float64).unsqueeze(1) * (self.top / self.bins)
        step = edges / ACT_INT8_QMAX  # (threshold, 1)
        quantized = torch.round(x / step).clamp(max=ACT_INT8_QMAX) * step
        err = (quantized - x).square() @ self.counts
        return min(edges[int(torch.argmin(err)), 0].item(), super().clip())


OBSERVERS = {"minmax": MinMaxObserver, "percentile": PercentileObserver, "mse": MSEObserver}


@dataclasses.dataclass(frozen=True)
class ActivationRange:
    """What calibration saw at one layer's input, and the static symmetric int8 scale it implies."""

    min: float
    max: float
    clip: float  # the threshold the observer chose: |x| beyond it saturates

    @property
    def scale(self) -> float:
        """Static int8 scale: ``x_int8 = clamp(round(x / scale), -127, 127)``."""
        return self.clip / ACT_INT8_QMAX

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the static int8 grid (in x's dtype): what a static-activation kernel would multiply."""
        if self.scale == 0:
            return torch.zeros_like(x)
        q = torch.round(x.to(torch.float32) / self.scale).clamp(-ACT_INT8_QMAX, ACT_INT8_QMAX)
        return (q * self.scale).to(x.dtype)


def quantizable_layers(model: nn.Module, layers: Optional[Callable] = None) -> Dict[str, nn.Module]:
    """The ``nn.Linear`` / ``nn.Conv2d`` modules of ``model`` by name, kept where ``layers(name, module)``."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and (layers is None or layers(name, m))
    }


def calibrate(
    model: nn.Module,
    batches: Iterable,
    observer="minmax",
    *,
    layers: Optional[Callable] = None,
    run_fn: Optional[Callable] = None,
) -> Dict[str, ActivationRange]:
    """Activation range at the input of every ``nn.Linear`` / ``nn.Conv2d`` (``layers(name, module)`` filters).

    ``observer`` is ``"minmax"``, ``"percentile"`` (99.99th of ``|x|``), ``"mse"``, or a zero-argument
    callable making an object with ``update(x)``, ``min``, ``max`` and ``clip()``.
    """
    if isinstance(observer, str):
        if observer not in OBSERVERS:
            raise ValueError(f"observer: got {observer!r}, expected one of {sorted(OBSERVERS)} or a factory")
        observer = OBSERVERS[observer]
    targets = quantizable_layers(model, layers)
    observers = {name: observer() for name in targets}
    with input_hooks(targets, lambda name, m, x: observers[name].update(x)):
        run_batches(model, batches, run_fn)
    unseen = [name for name, o in observers.items() if o.min > o.max]
    if unseen:
        raise ValueError(f"batches: layers {unseen} never ran; calibration needs batches that reach them")
    return {name: ActivationRange(o.min, o.max, o.clip()) for name, o in observers.items()}


# ---------------------------------------------------------------------------------------------- Hessians


def layer_input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows the layer multiplies by its flattened weight: ``(groups, tokens, K)`` float64.

    Linear: every token of ``x``. Conv2d: every output pixel's receptive field (im2col), ordered
    ``(C, kh, kw)`` like the flattened weight, one slice per channel group.
    """
    if isinstance(module, nn.Linear):
        return x.detach().reshape(1, -1, x.shape[-1]).to(torch.float64)
    x = x.detach().to(torch.float64)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    # Pad as the layer does (and QuantizedConv2d after it): asymmetric "same" and non-zero modes pad the input.
    input_padding, padding = _conv_input_padding(module.padding, module.kernel_size, module.dilation,
                                                 module.padding_mode)
    if input_padding is not None:
        x = F.pad(x, input_padding, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
    cols = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)  # (B, C*kh*kw, L)
    g = module.groups
    k = cols.shape[1] // g
    return cols.reshape(cols.shape[0], g, k, -1).permute(1, 0, 3, 2).reshape(g, -1, k)


def collect_hessians(
    model: nn.Module, batches: Iterable, modules: Dict[str, nn.Module], run_fn: Optional[Callable] = None
) -> Dict[str, torch.Tensor]:
    """``X^T X`` (float64, ``(K, K)``, or ``(groups, K, K)`` for a grouped conv) of each named module's input."""
    hessians = {}

    def accumulate(name, module, x):
        rows = layer_input_rows(module, x)
        h = rows.transpose(1, 2) @ rows
        hessians[name] = hessians[name] + h if name in hessians else h

    with input_hooks(modules, accumulate):
        run_batches(model, batches, run_fn)
    missing = [name for name in modules if name not in hessians]
    if missing:
        raise ValueError(f"batches: layers {missing} never ran; calibration needs batches that reach them")
    return {name: h[0] if h.shape[0] == 1 else h for name, h in hessians.items()}
