"""Shallow linear models fitted in full batch on fixed (cached) features.

* ``svm``: one-vs-rest linear SVM with the squared hinge loss, as in the CNN-SVM of Razavian et al.,
  "CNN Features off-the-shelf: an Astounding Baseline for Recognition" (2014). The objective per class is
  LIBLINEAR's (scikit-learn ``LinearSVC``): ``0.5 ||w||^2 + C * sum_i max(0, 1 - y_i (w.x_i + b))^2``.
* ``logistic``: L2-regularised logistic regression (multinomial, or one-vs-rest for multi-label targets)
  fitted with L-BFGS, the strength chosen on the validation split from a log-spaced grid and the model refitted
  on train+val, as in Kornblith et al., "Do Better ImageNet Models Transfer Better?" (2019). The objective is
  ``mean_i CE_i + reg / 2 * ||W||^2`` (scikit-learn's ``C`` is ``1 / (reg * N)``).

Both are convex; ``torch.optim.LBFGS`` with a strong-Wolfe line search solves them in float64. The bias is
not regularised. With more features than samples both are solved exactly in the span of the samples
(``row_space``). ``sweep_logistic`` / ``sweep_svm`` choose the strength / C on a validation split and
``refit`` fits the chosen one on train+val. Multi-label targets are {0, 1} vectors with -1 marking labels to
ignore.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tl_lightning.errors import TLError
from tl_lightning.methods.base import build_metrics

#: Default L2 strengths swept by the logistic head: 17 values, log-spaced over [1e-6, 1e2].
DEFAULT_REG_GRID: tuple[float, ...] = tuple(float(v) for v in np.logspace(-6, 2, 17))
#: Default C values swept by the SVM head (LIBLINEAR convention): 15 values, log-spaced over [1e-5, 1e2].
DEFAULT_C_GRID: tuple[float, ...] = tuple(float(v) for v in np.logspace(-5, 2, 15))


@dataclass
class LinearFit:
    """Weights ``[C, D]`` and bias ``[C]`` of a fitted linear model, and how the fit went."""

    weight: torch.Tensor
    bias: torch.Tensor
    objective: float
    iterations: int
    seconds: float

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.weight) @ self.weight.T + self.bias


@dataclass
class Sweep:
    """A regularisation sweep: validation score per value of ``param`` (``reg`` or ``C``) and the one chosen."""

    grid: list[float]
    val_scores: list[float]
    best_reg: float  # the chosen value of ``param``
    best_score: float
    fits: list[LinearFit] = field(default_factory=list, repr=False)
    param: str = "reg"

    @property
    def best_fit(self) -> LinearFit:
        return self.fits[self.grid.index(self.best_reg)]

    def as_dict(self) -> dict:
        return {f"{self.param}_grid": self.grid, "val_scores": self.val_scores, self.param: self.best_reg,
                "val_score": self.best_score}


def score(logits: torch.Tensor, targets: torch.Tensor, num_classes: int, multilabel: bool) -> float:
    """The task metric of ``TransferModule`` (accuracy, or macro mAP for multi-label) on one set."""
    metric = build_metrics(num_classes, multilabel)
    metric.update(logits.float(), targets.long() if multilabel else targets)
    value = float(next(iter(metric.compute().values())))
    return value if math.isfinite(value) else 0.0  # e.g. mAP of a split without any positive label


def _lbfgs(objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], weight: torch.Tensor,
           bias: torch.Tensor, max_iter: int, tol: float) -> LinearFit:
    """Minimise ``objective(weight, bias)`` in full batch with L-BFGS (strong-Wolfe line search)."""
    started = time.perf_counter()
    weight = weight.clone().requires_grad_(True)
    bias = bias.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, max_eval=int(max_iter * 1.25),
                            tolerance_grad=tol, tolerance_change=1e-9, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective(weight, bias)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        final = float(objective(weight, bias))
    iterations = int(opt.state[opt._params[0]].get("n_iter", 0))
    return LinearFit(weight.detach(), bias.detach(), final, iterations, time.perf_counter() - started)


def _one_vs_rest(targets: torch.Tensor, num_classes: int, multilabel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Signs in {-1, +1} per (sample, class) and a mask of the entries that count."""
    if multilabel:
        t = targets.to(torch.float64)
        return torch.where(t > 0, 1.0, -1.0).to(torch.float64), (t >= 0).to(torch.float64)
    onehot = F.one_hot(targets.long(), num_classes).to(torch.float64)
    return 2 * onehot - 1, torch.ones_like(onehot)


def _check(x: torch.Tensor, targets: torch.Tensor, num_classes: int, multilabel: bool) -> torch.Tensor:
    if x.ndim != 2 or len(x) != len(targets) or len(x) == 0:
        raise TLError(f"shallow heads need [N, D] features with N targets; got features {tuple(x.shape)} and "
                      f"{len(targets)} targets.")
    if not multilabel and (targets.min() < 0 or targets.max() >= num_classes):
        raise TLError(f"class targets must lie in [0, {num_classes}); check the data module's labels.")
    return x.to(torch.float64)


@dataclass
class RowSpace:
    """An orthonormal ``basis`` ``[D, N]`` of a space holding the span of ``x``'s rows, and ``x``'s coordinates
    in it, ``coords = x @ basis`` ``[N, N]``."""

    basis: torch.Tensor
    coords: torch.Tensor


def row_space(x: torch.Tensor) -> Optional[RowSpace]:
    """``x``'s row space when there are more features than samples (else None).

    Both heads' optimal weights lie in the span of the rows (the data term's gradient does, the L2 penalty is
    isotropic and the bias is not penalised), so fitting the coordinates (N unknowns per class instead of D)
    solves the same problem exactly: ``W = W_z @ basis.T``. The basis is the ``Q`` of a reduced QR
    factorisation ``x.T = Q R`` (so ``coords = R.T``): it spans the rows (and more, when they are linearly
    dependent, which does not change the minimiser), needs no rank threshold, and costs a tenth of an SVD
    (1,295 x 21,008 in float64: 3 s against 36 s here). With 21,008-d FNE features and a few hundred images
    each L-BFGS step becomes tens of times cheaper. A sweep computes it once for all its fits.
    """
    if x.shape[1] <= x.shape[0]:
        return None
    q, r = torch.linalg.qr(x.to(torch.float64).T, mode="reduced")
    return RowSpace(q.contiguous(), r.T.contiguous())


def _solve(objective_of: Callable, x: torch.Tensor, num_classes: int, init: Optional[LinearFit],
           space: Optional[RowSpace], max_iter: int, tol: float) -> LinearFit:
    """Minimise ``objective_of(z)(w, b)`` over the row space of ``x`` (or all of it when D <= N)."""
    space = row_space(x) if space is None else space
    z = x if space is None else space.coords.to(x)
    if init is not None:
        w0, b0 = init.weight.to(torch.float64), init.bias.to(torch.float64)
        w0 = w0 if space is None else w0 @ space.basis.to(w0)  # a warm start from another span: its projection
    else:
        w0 = torch.zeros(num_classes, z.shape[1], dtype=torch.float64)
        b0 = torch.zeros(num_classes, dtype=torch.float64)
    fit = _lbfgs(objective_of(z), w0, b0, max_iter=max_iter, tol=tol)
    if space is not None:
        fit.weight = fit.weight @ space.basis.to(fit.weight).T
    return fit


def fit_svm(x: torch.Tensor, targets: torch.Tensor, num_classes: int, multilabel: bool = False, C: float = 1.0,
            max_iter: int = 500, tol: float = 1e-5, init: Optional[LinearFit] = None,
            space: Optional[RowSpace] = None) -> LinearFit:
    """One-vs-rest linear SVM, squared hinge (Razavian et al. 2014), LIBLINEAR's primal objective with ``C``.

    ``space``: ``row_space(x)`` when already computed (a sweep computes it once)."""
    if C <= 0:
        raise TLError(f"the SVM's C must be positive (got {C}); set --model.svm_c to e.g. 1.0.")
    x = _check(x, targets, num_classes, multilabel)
    signs, mask = _one_vs_rest(targets, num_classes, multilabel)
    n = len(x)

    def objective_of(z: torch.Tensor) -> Callable:
        def objective(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            margins = (1 - signs * (z @ w.T + b)).clamp(min=0)
            # divided by N: the same minimiser, better scaled for the line search
            return (0.5 * (w * w).sum() + C * (mask * margins.square()).sum()) / n
        return objective

    return _solve(objective_of, x, num_classes, init, space, max_iter, tol)


def fit_logistic(x: torch.Tensor, targets: torch.Tensor, num_classes: int, multilabel: bool = False,
                 reg: float = 1e-4, max_iter: int = 500, tol: float = 1e-5,
                 init: Optional[LinearFit] = None, space: Optional[RowSpace] = None) -> LinearFit:
    """L2-regularised logistic regression: ``mean CE + reg/2 ||W||^2`` (multinomial, or one-vs-rest BCE)."""
    if reg < 0:
        raise TLError(f"the logistic regularisation strength must be >= 0 (got {reg}); fix --model.reg_grid.")
    x = _check(x, targets, num_classes, multilabel)
    if multilabel:
        t = targets.to(torch.float64)
        mask = (t >= 0).to(torch.float64)
        t = t.clamp(min=0)
        rows = max(1, len(x))

        def data_loss(logits: torch.Tensor) -> torch.Tensor:
            # sum over the labels of each sample, mean over samples (one binary problem per label)
            return (F.binary_cross_entropy_with_logits(logits, t, weight=mask, reduction="sum")) / rows
    else:
        y = targets.long()

        def data_loss(logits: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits, y)

    def objective_of(z: torch.Tensor) -> Callable:
        def objective(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return data_loss(z @ w.T + b) + 0.5 * reg * (w * w).sum()
        return objective

    return _solve(objective_of, x, num_classes, init, space, max_iter, tol)


def sweep_logistic(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
                   num_classes: int, multilabel: bool = False, grid: Sequence[float] = DEFAULT_REG_GRID,
                   max_iter: int = 500, space: Optional[RowSpace] = None) -> Sweep:
    """Fit one model per strength on train, score each on val, keep the best (Kornblith et al. 2019).

    Strengths are visited from strong to weak, each fit warm-started from the previous one (the solutions move
    smoothly along the path). Ties go to the stronger regularisation. ``space``: ``row_space(x_train)`` when
    already computed (the candidates of ``recipe: auto`` share it).
    """
    space = row_space(x_train) if space is None else space

    def fit(reg: float, init: Optional[LinearFit]) -> LinearFit:
        return fit_logistic(x_train, y_train, num_classes, multilabel, reg, max_iter, init=init, space=space)

    return _sweep(fit, grid, "reg", strong_first=lambda reg: -reg, x_val=x_val, y_val=y_val,
                  num_classes=num_classes, multilabel=multilabel)


def sweep_svm(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
              num_classes: int, multilabel: bool = False, grid: Sequence[float] = DEFAULT_C_GRID,
              max_iter: int = 500, space: Optional[RowSpace] = None) -> Sweep:
    """The SVM's C chosen on val like the logistic strength: small C (strong regularisation) first, warm
    started, ties to the smaller C."""
    space = row_space(x_train) if space is None else space

    def fit(c: float, init: Optional[LinearFit]) -> LinearFit:
        return fit_svm(x_train, y_train, num_classes, multilabel, C=c, max_iter=max_iter, init=init, space=space)

    return _sweep(fit, grid, "C", strong_first=lambda c: c, x_val=x_val, y_val=y_val, num_classes=num_classes,
                  multilabel=multilabel)


def _sweep(fit: Callable[[float, Optional[LinearFit]], LinearFit], grid: Sequence[float], param: str,
           strong_first: Callable[[float], float], x_val: torch.Tensor, y_val: torch.Tensor, num_classes: int,
           multilabel: bool) -> Sweep:
    grid = [float(g) for g in grid]
    if not grid:
        raise TLError(f"a sweep needs at least one value of {param}; set --model.{'reg_grid' if param == 'reg' else 'svm_c_grid'}.")
    if len(x_val) == 0:
        raise TLError("the sweep selects its regularisation on the validation split, which is empty; "
                      "set --data.val_fraction > 0.")
    order = sorted(range(len(grid)), key=lambda i: strong_first(grid[i]))
    fits: list[Optional[LinearFit]] = [None] * len(grid)
    scores = [0.0] * len(grid)
    previous = None
    for i in order:
        previous = fits[i] = fit(grid[i], previous)
        scores[i] = score(previous.logits(x_val.to(torch.float64)), y_val, num_classes, multilabel)
    best = max(order, key=lambda i: scores[i])  # max() keeps the first maximum: the strongest among ties
    return Sweep(grid, scores, grid[best], scores[best], fits, param)  # type: ignore[arg-type]


def refit(sweep: Sweep, x: torch.Tensor, y: torch.Tensor, num_classes: int, multilabel: bool = False,
          max_iter: int = 500) -> LinearFit:
    """The swept model refitted on ``x`` (train+val) at the chosen value, warm-started from its train fit."""
    if sweep.param == "C":
        return fit_svm(x, y, num_classes, multilabel, C=sweep.best_reg, max_iter=max_iter, init=sweep.best_fit)
    return fit_logistic(x, y, num_classes, multilabel, reg=sweep.best_reg, max_iter=max_iter, init=sweep.best_fit)
