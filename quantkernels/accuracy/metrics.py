"""How far a quantized model's outputs are from the float model's: per-sample cosine and SQNR."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import torch


def default_output(output) -> torch.Tensor:
    """The tensor to compare: the output itself, or the first floating tensor of a tuple / list / dict."""
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, dict) else output
    for v in values:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v
    raise TypeError(f"model output: got {type(output).__name__} without a floating tensor; pass output_fn")


@dataclasses.dataclass(frozen=True)
class OutputError:
    """Agreement of quantized outputs with float outputs over a set of samples (rows of the outputs)."""

    cosine: float  # mean over samples of cos(float output, quantized output)
    min_cosine: float
    sqnr_db: float  # 10 log10(sum y^2 / sum (y - y_q)^2) over everything

    @property
    def distance(self) -> float:
        """``1 - cosine``: small, and roughly additive over independently quantized layers."""
        return 1.0 - self.cosine


def output_error(
    reference: Sequence, outputs: Sequence, output_fn: Optional[Callable] = None
) -> OutputError:
    """Compares two lists of model outputs batch by batch; each batch's dim 0 indexes samples."""
    pick = output_fn or default_output
    cosines, signal, noise = [], 0.0, 0.0
    for ref, out in zip(reference, outputs, strict=True):
        r = pick(ref).detach().to(torch.float64)
        q = pick(out).detach().to(torch.float64)
        r, q = r.reshape(r.shape[0], -1), q.reshape(q.shape[0], -1)
        cosines.append(torch.nn.functional.cosine_similarity(r, q, dim=1, eps=1e-30))
        signal += r.square().sum().item()
        noise += (r - q).square().sum().item()
    cos = torch.cat(cosines)
    sqnr = math.inf if noise == 0 else 10 * math.log10(signal / noise)
    return OutputError(cos.mean().item(), cos.min().item(), sqnr)
