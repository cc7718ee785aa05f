"""Post-training rounding better than round-to-nearest, on one weight at a time.

Both methods return a :class:`~quantkernels.formats.QuantizedWeight` in the stored format, so the kernels run
the result unchanged; they only choose the scales, zero points and codes differently from
:func:`~quantkernels.formats.quantize_weight`.

* :func:`search_scales` shrinks each group's clipping range over a grid and keeps, per group, the scale whose
  rounding error is smallest -- weighted by how large each input channel's activations are, when calibration
  gives that (``importance``; the diagonal of the layer's input Gram matrix ``X^T X``).
* :func:`gptq` rounds one input column at a time and spreads each column's rounding error over the columns not
  yet rounded, in proportion to the layer's input Hessian ``H = X^T X`` (GPTQ, Frantar et al. 2022): it
  minimizes the layer's output error ``||X W^T - X Q^T||^2`` rather than the weight error.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional, Sequence

import torch

from .. import formats

#: Clipping factors tried per group: the range is shrunk from the full absmax / [min, max] down to half of it.
CLIP_GRID = tuple(1.0 - 0.025 * i for i in range(21))
#: GPTQ's dampening: ``damp * mean(diag(H))`` is added to the diagonal so that ``H`` stays invertible when
#: calibration sees fewer independent tokens than input features (the value the GPTQ paper uses).
GPTQ_DAMP = 0.01
#: Columns GPTQ rounds before propagating their error to the rest of the matrix in one matmul (lazy batch
#: updates); a multiple of every group size up to 128, so a group never straddles two blocks.
GPTQ_BLOCK = 128


def _check_grid(grid):
    if len(grid) == 0 or any(not 0.0 < a <= 1.0 for a in grid):
        raise ValueError(f"grid: got {list(grid)}, expected a non-empty list of clipping factors in (0, 1]")


def best_group_params(groups, bits, symmetric, importance=None, grid: Sequence[float] = CLIP_GRID):
    """Per-group scale and zero point (float32 ``(..., n_groups)``) minimizing the weighted rounding error.

    ``groups`` is ``(N, n_groups, group_len)``; ``importance`` (broadcastable to it, e.g. ``(1, n_groups,
    group_len)``) weights each element's squared error. Factor ``a`` of the grid quantizes as round-to-nearest
    would quantize ``a * W``: the clipping range shrinks, elements beyond it saturate. ``a = 1`` is plain
    round-to-nearest, so including it means the search is never worse than RTN on this error.
    """
    groups = groups.to(torch.float32)
    best = None
    for a in grid:
        scale, zero = formats.group_params(groups * a, bits, symmetric)
        codes = formats.encode_groups(groups, scale, zero, bits, symmetric)
        err = ((codes - zero.unsqueeze(-1)) * scale.unsqueeze(-1) - groups).square()
        if importance is not None:
            err = err * importance
        err = err.sum(-1)
        if best is None:
            best, best_scale, best_zero = err, scale, zero
        else:
            better = err < best
            best = torch.where(better, err, best)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _importance_groups(importance, n, k, bits, group_size):
    """Per-input weights cut like the weight: ``(1 or n, n_groups, group_len)``.

    ``importance`` is ``(K,)`` for every row, or ``(groups, K)`` for a grouped conv whose output channel
    groups (blocks of ``n / groups`` rows) see different inputs.
    """
    if importance is None:
        return None
    if importance.dim() == 1:
        importance = importance.unsqueeze(0)
    if importance.dim() != 2 or importance.shape[1] != k or n % importance.shape[0]:
        raise ValueError(
            f"importance: got shape {tuple(importance.shape)}, expected ({k},) or (groups, {k}) with groups "
            f"dividing out_features={n}"
        )
    if not (torch.isfinite(importance).all() and (importance >= 0).all()):
        raise ValueError("importance: expected finite, non-negative weights (mean squares of the inputs)")
    rows = importance.repeat_interleave(n // importance.shape[0], dim=0) if importance.shape[0] > 1 else importance
    return formats.weight_groups(rows.to(torch.float32), bits, group_size)


def search_scales(
    w: torch.Tensor,
    bits: int = 4,
    group_size: Optional[int] = None,
    symmetric: bool = True,
    *,
    importance: Optional[torch.Tensor] = None,
    grid: Sequence[float] = CLIP_GRID,
) -> formats.QuantizedWeight:
    """Like :func:`~quantkernels.formats.quantize_weight`, but each group's clipping range is searched.

    ``importance`` (optional) is the mean square of each input feature on calibration data, ``(K,)`` (or
    ``(groups, K)`` for a grouped conv): with it the search minimizes an estimate of the layer's output error
    (the diagonal of ``(W - Q) X^T X (W - Q)^T``) instead of the weight error.
    """
    formats.check_quantize_args(w, bits, group_size, symmetric)
    _check_grid(grid)
    groups = formats.weight_groups(w, bits, group_size)
    imp = _importance_groups(importance, w.shape[0], w[0].numel(), bits, group_size)
    scale, zero = best_group_params(groups, bits, symmetric, imp, grid)
    codes = formats.encode_groups(groups, scale, zero, bits, symmetric)
    return formats.from_codes(codes.reshape(w.shape[0], -1), scale, zero, bits, group_size, symmetric, w.shape)


def gptq(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits: int = 4,
    group_size: Optional[int] = None,
    symmetric: bool = True,
    *,
    damp: float = GPTQ_DAMP,
    act_order: bool = False,
    grid: Sequence[float] = CLIP_GRID,
) -> formats.QuantizedWeight:
    """GPTQ rounding of ``w`` (``(N, ...)``, flattened to ``(N, K)``) given the input Hessian ``X^T X``.

    Shorthand for ``GPTQSolver(hessian, damp, act_order).quantize(w, bits, group_size, symmetric, grid)``;
    keep the solver to quantize one layer in several formats (it factors ``H`` once).
    """
    return GPTQSolver(hessian, damp=damp, act_order=act_order).quantize(w, bits, group_size, symmetric, grid=grid)


class GPTQSolver:
    """One layer's GPTQ setup, independent of the format: the column order and the factor of ``H^-1``.

    ``hessian`` is ``X^T X`` of the layer's inputs, ``(K, K)``, or ``(groups, K, K)`` for a grouped
    convolution, whose output channels ``[j*N/groups, (j+1)*N/groups)`` see only input channel group ``j``.

    ``act_order`` rounds the columns with the largest ``H`` diagonal first (usually more accurate). The
    stored format keeps contiguous groups along K with one scale each, so with act-order every group's scale
    is fixed up front from the unmodified weight ("static groups") instead of when its first column is
    reached, which in act-order may be long before its other columns.
    """

    def __init__(self, hessian: torch.Tensor, *, damp: float = GPTQ_DAMP, act_order: bool = False):
        if not isinstance(hessian, torch.Tensor) or hessian.dim() not in (2, 3) or hessian.shape[-1] != hessian.shape[-2]:
            got = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
            raise ValueError(f"hessian: got {got}, expected a (K, K) or (groups, K, K) tensor X^T X")
        if not torch.isfinite(hessian).all():
            raise ValueError("hessian: contains NaN or Inf; calibration inputs must be finite")
        if not damp > 0:
            raise ValueError(f"damp: got {damp}, expected a positive fraction of the mean Hessian diagonal")
        self.act_order = act_order
        self.parts = [_factor(h.to(torch.float64), damp, act_order) for h in hessian.reshape(-1, *hessian.shape[-2:])]
        self.in_features = hessian.shape[-1]

    def quantize(
        self, w: torch.Tensor, bits: int = 4, group_size: Optional[int] = None, symmetric: bool = True, *,
        grid: Sequence[float] = CLIP_GRID,
    ) -> formats.QuantizedWeight:
        """``w`` (``(N, ...)``, flattened to ``(N, K)``) rounded by GPTQ into the stored format.

        Each scale group's clipping is searched over ``grid`` (``(1.0,)`` gives GPTQ's plain absmax scales).
        """
        formats.check_quantize_args(w, bits, group_size, symmetric)
        _check_grid(grid)
        n, k = w.shape[0], w[0].numel()
        if k != self.in_features or n % len(self.parts):
            raise ValueError(
                f"weight: got shape {tuple(w.shape)}, expected K={self.in_features} input features and out_features "
                f"divisible by the {len(self.parts)} channel groups of the Hessian"
            )
        rows = n // len(self.parts)
        w2 = w.detach().reshape(n, k)
        with single_thread():
            results = [
                _gptq_rows(w2[j * rows : (j + 1) * rows], part, bits, group_size, symmetric, self.act_order, grid)
                for j, part in enumerate(self.parts)
            ]
        codes, scale, zero = (torch.cat(t) for t in zip(*results))
        return formats.from_codes(codes, scale, zero, bits, group_size, symmetric, w.shape)


@contextlib.contextmanager
def single_thread():
    """Runs torch ops on one thread: GPTQ's column loop is thousands of ops on vectors of a few hundred
    elements, where intra-op threads only add synchronization (20x slower with 2 threads on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclasses.dataclass
class _Factor:
    perm: torch.Tensor  # column order: natural, or by decreasing H diagonal (act-order)
    dead: torch.Tensor  # inputs calibration never saw non-zero
    importance: torch.Tensor  # float32 (K,): the H diagonal, 0 for dead inputs
    u: torch.Tensor  # float32 upper Cholesky factor of H^-1 in perm order


def _factor(h: torch.Tensor, damp: float, act_order: bool) -> _Factor:
    h = h.clone()
    # An input that calibration never saw non-zero contributes nothing to the output: its weight may be
    # anything (it is zeroed before rounding, so it never widens a group's range); a unit diagonal keeps H
    # invertible.
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    importance = torch.where(dead, 0.0, h.diagonal()).to(torch.float32)
    k = h.shape[0]
    perm = torch.argsort(importance, descending=True, stable=True) if act_order else torch.arange(k)
    h = h[perm][:, perm]
    h.diagonal().add_(damp * h.diagonal().mean())
    # GPTQ needs the rows of H^-1 restricted to the columns not yet rounded; the upper Cholesky factor of
    # H^-1 holds exactly those, scaled, so one factorization replaces K Schur-complement updates.
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    return _Factor(perm, dead, importance, u.to(torch.float32))


def _gptq_rows(w, f: _Factor, bits, group_size, symmetric, act_order, grid):
    """GPTQ on ``w`` ``(n, K)``: returns codes ``(n, K_pad)``, scale and zero point ``(n, n_groups)``.

    The weights and the error feedback are float32, as in GPTQ's reference code; H was inverted in float64.
    """
    n, k = w.shape
    glen = formats.group_len_for(bits, k, group_size)
    n_groups = formats.padded_k(bits, k, group_size) // glen
    w = w.to(torch.float32).clone()
    w[:, f.dead] = 0.0
    imp_groups = _importance_groups(f.importance, n, k, bits, group_size)

    scale = torch.zeros(n, n_groups, dtype=torch.float32)
    zero = torch.zeros(n, n_groups, dtype=torch.float32)
    ready = [act_order] * n_groups
    if act_order:
        scale, zero = best_group_params(formats.weight_groups(w, bits, group_size), bits, symmetric, imp_groups, grid)
    perm, u = f.perm, f.u
    group_of = (perm // glen).tolist()
    u_diag = u.diagonal().tolist()
    w = w[:, perm]

    lo, hi = formats.code_limits(bits, symmetric)
    codes = torch.empty(n, k, dtype=torch.float32)
    block = max(GPTQ_BLOCK, glen) if group_size is not None else GPTQ_BLOCK
    for b0 in range(0, k, block):
        b1 = min(k, b0 + block)
        wb = w[:, b0:b1].clone()
        errs = torch.empty_like(wb)
        current = None
        for j in range(b1 - b0):
            g = group_of[b0 + j]
            if not ready[g]:
                # Without act-order a group starts here and its columns are this one and the next glen - 1:
                # inside this block (updated so far), or from the block start on (then j == 0 and the columns
                # past the block are up to date too).
                end = j + glen
                cur = wb[:, j:end] if end <= b1 - b0 else torch.cat((wb[:, j:], w[:, b1 : b0 + end]), 1)
                imp = None if imp_groups is None else imp_groups[:, g : g + 1, : cur.shape[1]]
                s, z = best_group_params(cur.unsqueeze(1), bits, symmetric, imp, grid)
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
                ready[g] = True
            if g != current:
                current, s, z = g, scale[:, g], zero[:, g]
                # A zero scale means the whole group decodes to zero whatever its codes (set to the zero point
                # below); dividing by 1 keeps the arithmetic finite.
                safe = torch.where(s > 0, s, 1.0)
            # formats.encode_groups' arithmetic, inlined: this loop runs K times and is bound by op overhead.
            q = (wb[:, j] / safe).round_().add_(z).clamp_(lo, hi)
            codes[:, b0 + j] = q
            err = (wb[:, j] - (q - z).mul_(s)).div_(u_diag[b0 + j])
            wb[:, j:].addr_(err, u[b0 + j, b0 + j : b1], alpha=-1.0)
            errs[:, j] = err
        w[:, b1:].addmm_(errs, u[b0:b1, b1:], alpha=-1.0)

    # Back to the natural column order. Pad columns, and every column of a zero-scale group, get
    # code = zero point: exact zeros, as quantize_weight stores them.
    zeros = zero.repeat_interleave(glen, dim=1)
    natural = zeros.clone()
    natural[:, perm] = codes
    return torch.where(scale.repeat_interleave(glen, dim=1) > 0, natural, zeros), scale, zero
