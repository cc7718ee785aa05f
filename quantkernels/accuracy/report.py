"""Size, accuracy and speed before and after quantization, in the table users look for.

>>> report = QuantizationReport()
>>> report.add("Fashion-MNIST CNN, int4 GPTQ", float_model, quantized_model, metrics=lambda m: {"top-1": ...},
...            example=images[:1])
>>> print(report)   # a markdown table
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ..nn.swap import model_nbytes
from .calibration import default_run, evaluating

#: Timed forward passes per measurement (the median is reported) after this many warm-up passes.
LATENCY_REPEATS = 10
LATENCY_WARMUP = 2


def latency_ms(model: nn.Module, example, *, run_fn: Optional[Callable] = None, repeats: int = LATENCY_REPEATS) -> float:
    """Median wall time in ms of ``run_fn(model, example)`` (default ``model(example)``), in eval mode."""
    run = run_fn or default_run
    times = []
    with evaluating(model):
        for i in range(LATENCY_WARMUP + repeats):
            start = time.perf_counter()
            run(model, example)
            if i >= LATENCY_WARMUP:
                times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


@dataclasses.dataclass(frozen=True)
class ReportRow:
    model: str
    float_bytes: int
    quantized_bytes: int
    float_metrics: Dict[str, float]
    quantized_metrics: Dict[str, float]
    float_ms: Optional[float]
    quantized_ms: Optional[float]

    @property
    def speedup(self) -> Optional[float]:
        if self.float_ms is None or self.quantized_ms is None:
            return None
        return self.float_ms / self.quantized_ms


@dataclasses.dataclass
class QuantizationReport:
    """Rows of (model, float size, quantized size, metrics before -> after, latency, speedup);
    ``str()`` is a markdown table."""

    rows: List[ReportRow] = dataclasses.field(default_factory=list)

    def add(
        self,
        name: str,
        float_model: nn.Module,
        quantized_model: nn.Module,
        metrics: Callable[[nn.Module], Dict[str, float]],
        *,
        example=None,
        run_fn: Optional[Callable] = None,
        repeats: int = LATENCY_REPEATS,
    ) -> ReportRow:
        """Measures both models: sizes, ``metrics(model)`` (e.g. ``{"top-1": 91.2}``), and with ``example``
        the latency of one ``run_fn(model, example)`` (default ``model(example)``)."""
        before, after = metrics(float_model), metrics(quantized_model)
        if set(before) != set(after):
            raise ValueError(f"metrics: got keys {sorted(before)} for the float model and {sorted(after)} for the "
                             f"quantized one, expected the same")
        ms = (None, None)
        if example is not None:
            ms = tuple(latency_ms(m, example, run_fn=run_fn, repeats=repeats) for m in (float_model, quantized_model))
        row = ReportRow(name, model_nbytes(float_model), model_nbytes(quantized_model), before, after, *ms)
        self.rows.append(row)
        return row

    def __str__(self) -> str:
        head = ["model", "float size", "quantized size", "accuracy (float → quantized)", "latency float",
                "latency quantized", "speedup"]
        lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for r in self.rows:
            acc = ", ".join(f"{k} {_number(r.float_metrics[k])} → {_number(r.quantized_metrics[k])}"
                            for k in r.float_metrics)
            cells = [
                r.model,
                _size(r.float_bytes),
                f"{_size(r.quantized_bytes)} ({r.float_bytes / r.quantized_bytes:.1f}x smaller)",
                acc,
                "-" if r.float_ms is None else f"{r.float_ms:.2f} ms",
                "-" if r.quantized_ms is None else f"{r.quantized_ms:.2f} ms",
                "-" if r.speedup is None else f"{r.speedup:.2f}x",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _number(x: float) -> str:
    return f"{x:.4f}" if abs(x) < 1.5 else f"{x:.2f}"
