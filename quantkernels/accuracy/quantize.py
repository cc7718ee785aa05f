"""Better rounding for a whole model: calibrate once, round every layer, swap in the kernels.

:func:`quantize_model` is ``swap_to_quantized`` with the weights rounded by GPTQ (or the clipping search)
instead of round-to-nearest; :class:`WeightRounder` is the per-layer machinery it (and the sensitivity
analysis) uses.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

from ..config import QuantConfig
from ..formats import QuantizedWeight
from ..nn.fold import fold_before_rounding
from ..nn.swap import plan_swap, swap_to_quantized
from . import calibration
from .rounding import CLIP_GRID, GPTQ_DAMP, GPTQSolver, search_scales

METHODS = ("rtn", "search", "gptq")


class WeightRounder:
    """Rounds the weights of ``modules`` (name -> layer of ``model``) by ``method``, calibrated on ``batches``.

    * ``"rtn"``: :func:`~quantkernels.formats.quantize_weight`, no calibration;
    * ``"search"``: :func:`~quantkernels.accuracy.search_scales` weighted by each input's mean square;
    * ``"gptq"``: :class:`~quantkernels.accuracy.GPTQSolver` on each layer's input Hessian.

    Inputs are collected from the float model in one pass; a layer's solver is built on first use and kept,
    so rounding it in several formats factors its Hessian once.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence,
        modules: Dict[str, nn.Module],
        *,
        method: str = "gptq",
        run_fn: Optional[Callable] = None,
        damp: float = GPTQ_DAMP,
        act_order: bool = False,
        grid: Sequence[float] = CLIP_GRID,
    ):
        if method not in METHODS:
            raise ValueError(f"method: got {method!r}, expected one of {METHODS}")
        self.method, self.modules, self.damp, self.act_order, self.grid = method, modules, damp, act_order, grid
        self.hessians = {} if method == "rtn" else calibration.collect_hessians(model, batches, modules, run_fn)
        self.solvers: Dict[str, GPTQSolver] = {}

    def round(self, name: str, config: QuantConfig) -> QuantizedWeight:
        weight = self.modules[name].weight.detach()
        args = (config.bits, config.group_size, config.symmetric)
        if self.method == "rtn":
            return config.quantize(weight)
        h = self.hessians[name]
        if self.method == "search":
            return search_scales(weight, *args, importance=h.diagonal(dim1=-2, dim2=-1).to(torch.float32), grid=self.grid)
        if name not in self.solvers:
            self.solvers[name] = GPTQSolver(h, damp=self.damp, act_order=self.act_order)
        return self.solvers[name].quantize(weight, *args, grid=self.grid)


def quantize_model(
    model: nn.Module,
    batches: Sequence,
    config: Optional[QuantConfig] = None,
    *,
    method: str = "gptq",
    run_fn: Optional[Callable] = None,
    damp: float = GPTQ_DAMP,
    act_order: bool = False,
    grid: Sequence[float] = CLIP_GRID,
    **swap_kwargs,
) -> nn.Module:
    """``swap_to_quantized(model, config, **swap_kwargs)`` with every layer's weight rounded by ``method``
    (GPTQ by default) on calibration ``batches`` instead of to nearest; in place, returns the model.

    ``swap_kwargs`` are ``swap_to_quantized``'s (``bits=``, ``group_size=``, ``skip=``, ``layer_configs=``,
    ...; ``fold_batchnorm=True`` folds before rounding); ``run_fn(model, batch)`` feeds a batch (default
    ``model(*batch)`` for a tuple, else ``model(batch)``).
    """
    fold_before_rounding(model, swap_kwargs)
    plan = plan_swap(model, config, **swap_kwargs)
    modules = {name: model.get_submodule(name) for name, c in plan.items() if c is not None}
    rounder = WeightRounder(model, batches, modules, method=method, run_fn=run_fn, damp=damp, act_order=act_order,
                            grid=grid)
    weights = {name: rounder.round(name, plan[name]) for name in modules}
    del rounder, modules
    return swap_to_quantized(model, config, weights=weights, **swap_kwargs)
