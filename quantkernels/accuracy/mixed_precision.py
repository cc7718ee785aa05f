"""Automatic mixed precision: int4 where the model does not notice, int8 or float where it does.

Each layer's options are its candidate formats from a :class:`~quantkernels.accuracy.SensitivityReport`
plus float. Quantization noise from different layers is close to independent, so the model's output
distance ``1 - cosine`` with several layers quantized is close to the sum of the distances each layer
causes alone. :func:`choose_mixed_precision` minimizes that sum under a size budget, or the size under a
distance budget, greedily: starting from the smallest option everywhere, it repeatedly takes the upgrade
that buys the most distance per added bit. :func:`auto_mixed_precision` runs the analysis, makes the choice
and then measures the model with all its choices together, taking further upgrades until the measured
cosine meets the target.

Sizes are the stored bits of each weight: codes, scales and zero points (biases stay float in every option
and are not counted); float layers count at their float dtype's width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from torch import nn

from ..config import QuantConfig
from ..formats import QuantizedWeight
from ..nn.swap import swap_to_quantized
from . import calibration
from .fake_quant import simulated
from .metrics import OutputError, output_error
from .sensitivity import DEFAULT_CANDIDATES, SensitivityReport, sensitivity_analysis

#: How many times auto_mixed_precision re-measures after tightening its estimate before giving up.
MAX_REFINEMENTS = 8


@dataclasses.dataclass(frozen=True)
class Option:
    config: Optional[QuantConfig]  # None: the layer stays float
    bits: int
    distance: float  # 1 - cosine of the model's output with this layer alone in this format


@dataclasses.dataclass
class MixedPrecisionPlan:
    """A format per layer (None = float), with its size and its estimated (and measured) output cosine.

    ``layer_configs`` goes to ``swap_to_quantized``; :meth:`apply` does the swap and installs the weights the
    plan was measured with (GPTQ's, when the report used it).
    """

    configs: Dict[str, Optional[QuantConfig]]
    bits: int  # stored bits of all the planned layers' weights
    weights: int  # their number of weight elements
    estimated_cosine: float  # 1 - the sum of the per-layer distances
    quantized: Dict[str, QuantizedWeight] = dataclasses.field(repr=False)
    measured: Optional[OutputError] = None  # on the calibration batches, all layers together

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.weights

    @property
    def layer_configs(self) -> Dict[str, Optional[QuantConfig]]:
        return dict(self.configs)

    def apply(self, model: nn.Module, *, progress: Optional[bool] = None) -> nn.Module:
        """Swaps the planned layers of ``model`` (in place) to the kernels in their planned formats, with the
        weights the plan was measured with; every other layer stays as it is."""
        return swap_to_quantized(model, layer_configs=self.layer_configs, weights=self.quantized,
                                 filter_fn=lambda module, name: name in self.configs, progress=progress)

    def __str__(self) -> str:
        counts: Dict[str, int] = {}
        for c in self.configs.values():
            key = c.describe() if c else "float"
            counts[key] = counts.get(key, 0) + 1
        measured = f", measured cosine {self.measured.cosine:.4f}" if self.measured else ""
        mix = ", ".join(f"{n} x {k}" for k, n in sorted(counts.items()))
        return (f"mixed precision: {self.bits_per_weight:.3f} bits per weight, estimated cosine "
                f"{self.estimated_cosine:.4f}{measured}; {mix}")


def _options(report: SensitivityReport, allow_float: bool) -> Dict[str, List[Option]]:
    """Each layer's options, by increasing size, with dominated ones (bigger and no better) dropped."""
    options = {}
    for name, layer in report.layers.items():
        opts = [Option(c, layer.stored_bits[c], layer.errors[c].distance) for c in layer.errors]
        if allow_float:
            opts.append(Option(None, layer.float_bits, 0.0))
        opts.sort(key=lambda o: (o.bits, o.distance))
        kept = []
        for o in opts:
            if not kept or o.distance < kept[-1].distance:
                kept.append(o)
        options[name] = kept
    return options


def _greedy(options: Dict[str, List[Option]], max_bits: float):
    """Yields successive choices (name -> option index), each one upgrade on from the last, cheapest first.

    The upgrade taken is the one with the largest distance saved per bit added among those that keep the
    total within ``max_bits``; an upgrade may skip over options (the convex-hull step), so a layer goes
    straight from int4 to float when int8 saves little.
    """
    choice = {name: 0 for name in options}
    total = sum(opts[0].bits for opts in options.values())
    yield dict(choice)
    while True:
        best = None
        for name, opts in options.items():
            cur = opts[choice[name]]
            for i in range(choice[name] + 1, len(opts)):
                added = opts[i].bits - cur.bits
                if total + added > max_bits:
                    break
                rate = (cur.distance - opts[i].distance) / added
                if best is None or rate > best[0]:
                    best = (rate, name, i, added)
        if best is None or best[0] <= 0:
            return
        _, name, i, added = best
        choice[name] = i
        total += added
        yield dict(choice)


def choose_mixed_precision(
    report: SensitivityReport,
    *,
    min_cosine: Optional[float] = None,
    max_bits_per_weight: Optional[float] = None,
    allow_float: bool = True,
) -> MixedPrecisionPlan:
    """A format per layer from ``report``: the smallest whose estimated cosine reaches ``min_cosine``, or the
    most accurate within ``max_bits_per_weight`` (both: the smallest reaching ``min_cosine`` within the size,
    else the most accurate within the size). ``allow_float=False`` keeps every layer quantized."""
    if min_cosine is None and max_bits_per_weight is None:
        raise ValueError("give min_cosine (an error budget) or max_bits_per_weight (a size budget), or both")
    if min_cosine is not None and not -1.0 <= min_cosine <= 1.0:
        raise ValueError(f"min_cosine: got {min_cosine}, expected a cosine in [-1, 1]")
    options = _options(report, allow_float)
    weights = sum(layer.weights for layer in report.layers.values())
    floor = sum(opts[0].bits for opts in options.values()) / weights
    if max_bits_per_weight is not None and max_bits_per_weight < floor:
        raise ValueError(
            f"max_bits_per_weight: got {max_bits_per_weight}, below the {floor:.3f} bits per weight of the "
            f"smallest candidate format in every layer"
        )
    steps = _steps(options, max_bits_per_weight, weights)
    budget = -math.inf if min_cosine is None else 1.0 - min_cosine
    return _plan(report, options, steps[_first_within(options, steps, budget)], weights)


def _steps(options, max_bits_per_weight, weights) -> List[Dict[str, int]]:
    max_bits = math.inf if max_bits_per_weight is None else max_bits_per_weight * weights
    return list(_greedy(options, max_bits))


def _first_within(options, steps, distance_budget, start: int = 0) -> int:
    """The first greedy step from ``start`` on whose estimated distance is within budget, else the last."""
    for i in range(start, len(steps)):
        if sum(options[n][j].distance for n, j in steps[i].items()) <= distance_budget:
            return i
    return len(steps) - 1


def _plan(report, options, choice, weights) -> MixedPrecisionPlan:
    picked = {name: options[name][i] for name, i in choice.items()}
    return MixedPrecisionPlan(
        configs={name: o.config for name, o in picked.items()},
        bits=sum(o.bits for o in picked.values()),
        weights=weights,
        estimated_cosine=1.0 - sum(o.distance for o in picked.values()),
        quantized={name: report.quantized[(name, o.config)] for name, o in picked.items() if o.config is not None},
    )


def measure_plan(
    model: nn.Module, batches: Sequence, plan: MixedPrecisionPlan, *, run_fn=None, output_fn=None, reference=None
) -> OutputError:
    """The model's output error on ``batches`` with every planned layer quantized at once (simulated)."""
    modules = {name: model.get_submodule(name) for name in plan.quantized}
    reference = reference if reference is not None else calibration.run_batches(model, batches, run_fn)
    weights = {name: (qw, plan.configs[name].act_int8) for name, qw in plan.quantized.items()}
    with simulated(modules, weights):
        return output_error(reference, calibration.run_batches(model, batches, run_fn), output_fn)


def auto_mixed_precision(
    model: nn.Module,
    batches: Sequence,
    *,
    min_cosine: Optional[float] = None,
    max_bits_per_weight: Optional[float] = None,
    candidates: Iterable[QuantConfig] = DEFAULT_CANDIDATES,
    method: str = "gptq",
    allow_float: bool = True,
    run_fn: Optional[Callable] = None,
    output_fn: Optional[Callable] = None,
    skip: Iterable[str] = (),
    filter_fn: Optional[Callable] = None,
    report: Optional[SensitivityReport] = None,
) -> MixedPrecisionPlan:
    """Sensitivity analysis, the greedy choice, and a check of the whole choice on ``batches``.

    With ``min_cosine``, when the measured cosine falls short of the estimate's promise, the distance budget
    of the estimate is tightened by the measured-to-estimated ratio and the choice extended, up to
    :data:`MAX_REFINEMENTS` times (within ``max_bits_per_weight`` if given). Pass ``report`` to reuse an analysis.
    """
    batches = list(batches)
    report = report or sensitivity_analysis(model, batches, candidates, method=method, run_fn=run_fn,
                                            output_fn=output_fn, skip=skip, filter_fn=filter_fn)
    plan = choose_mixed_precision(report, min_cosine=min_cosine, max_bits_per_weight=max_bits_per_weight,
                                  allow_float=allow_float)
    reference = calibration.run_batches(model, batches, run_fn)
    plan.measured = measure_plan(model, batches, plan, run_fn=run_fn, output_fn=output_fn, reference=reference)
    if min_cosine is None:
        return plan
    options = _options(report, allow_float)
    steps = _steps(options, max_bits_per_weight, plan.weights)
    step = _first_within(options, steps, 1.0 - min_cosine)
    target = budget = 1.0 - min_cosine
    for _ in range(MAX_REFINEMENTS):
        if plan.measured.cosine >= min_cosine or step == len(steps) - 1:
            break
        # The estimate was optimistic by measured / estimated distance: ask it for that much less than the
        # target, and take at least one more upgrade so that every refinement changes the plan.
        ratio = (1.0 - plan.estimated_cosine) / max(plan.measured.distance, 1e-12)
        budget = min(target * ratio, budget)
        step = _first_within(options, steps, budget, start=step + 1)
        plan = _plan(report, options, steps[step], plan.weights)
        plan.measured = measure_plan(model, batches, plan, run_fn=run_fn, output_fn=output_fn, reference=reference)
    return plan
