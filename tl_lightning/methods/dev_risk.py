"""Model selection without target labels: Deep Embedded Validation (DEV; You, Wang, Chen, Long & Wang,
"Towards Accurate Model Selection in Deep Unsupervised Domain Adaptation", ICML 2019).

The target risk of a model equals its source risk reweighted by the density ratio ``w(x) = p_t(x) / p_s(x)``
in the model's feature space (importance-weighted validation, Sugiyama et al., JMLR 2007). DEV estimates ``w``
with a domain discriminator, ``w(x) = n_s/n_t · p(target|x) / p(source|x)``, applies it to the per-sample losses
of the *source validation* split, and removes most of the estimator's variance with ``w`` as a control variate
(its expectation is 1):

    L_i = w_i ℓ_i,   η = -Cov(L, w) / Var(w),   DEV risk = mean(L) + η · mean(w) - η.

Lower is better. Its standard error (``val/dev_risk_se``) says how far apart two checkpoints' risks must be for the
ranking to mean something, and ``OneStandardErrorRule`` chooses with it: of the checkpoints whose risk is within one
standard error of the lowest, the latest. Only source labels and unlabelled target images are read. Here the
discriminator is an L2-regularised logistic regression on standardised features (``fit_logistic``), cross-fitted
over ``folds`` folds so that no source sample is weighted by a discriminator that saw it.
"""
from __future__ import annotations

import math

import torch

from tl_lightning.errors import TLError
from tl_lightning.methods.shallow_heads import fit_logistic


def density_ratios(source: torch.Tensor, target: torch.Tensor, folds: int = 2, reg: float = 1e-3,
                   seed: int = 0) -> torch.Tensor:
    """``w(x) = n_s/n_t · p(target|x) / p(source|x)`` for every row of ``source`` (features ``[N_s, D]``), from
    a discriminator between ``source`` and ``target`` (``[N_t, D]``) fitted on the other folds of both."""
    if len(source) < folds or len(target) < folds:
        raise TLError(f"DEV needs at least {folds} source and {folds} target validation samples (got {len(source)} "
                      f"and {len(target)}); give the validation splits more samples.")
    x = torch.cat([source, target]).double()
    x = (x - x.mean(0)) / x.std(0).clamp(min=1e-8)
    domains = torch.cat([torch.zeros(len(source)), torch.ones(len(target))]).long()
    generator = torch.Generator().manual_seed(seed)
    fold = torch.cat([torch.randperm(len(source), generator=generator) % folds,
                      torch.randperm(len(target), generator=generator) % folds])
    log_odds = torch.empty(len(source), dtype=torch.float64)
    for f in range(folds):
        held = fold == f
        fit = fit_logistic(x[~held], domains[~held], 2, reg=reg)
        logits = fit.logits(x[held][domains[held] == 0])
        # the fold's prior n_t/n_s is in the logits: p(t|x)/p(s|x) = prior · p_t(x)/p_s(x)
        prior = (domains[~held] == 1).sum() / (domains[~held] == 0).sum()
        log_odds[held[: len(source)]] = (logits[:, 1] - logits[:, 0]) - prior.log()
    return log_odds.exp()


def dev_estimate(losses: torch.Tensor, weights: torch.Tensor) -> tuple[float, float]:
    """DEV's control-variate estimate of the target risk from per-sample source losses and density ratios, and its
    standard error: the estimate is the mean of ``z_i = w_i ℓ_i + η (w_i - 1)``, so its standard error is
    ``std(z) / sqrt(n)`` (for the fitted ``w`` and ``η``: their own estimation adds to it). Two checkpoints whose
    risks differ by less than about their standard errors are not told apart by DEV."""
    weighted = weights.double() * losses.double()
    w = weights.double()
    variance = ((w - w.mean()) ** 2).mean()
    eta = -((weighted - weighted.mean()) * (w - w.mean())).mean() / variance if variance > 0 else 0.0
    z = weighted + eta * (w - 1)
    standard_error = float(z.std() / len(z) ** 0.5) if len(z) > 1 else float("nan")
    return float(z.mean()), standard_error


def dev_risk(losses: torch.Tensor, weights: torch.Tensor) -> float:
    """DEV's control-variate estimate of the target risk (``dev_estimate`` without its standard error)."""
    return dev_estimate(losses, weights)[0]


class OneStandardErrorRule:
    """The one-standard-error rule (Breiman et al. 1984; Hastie, Tibshirani & Friedman, *The Elements of
    Statistical Learning*, 7.10) over the epochs of one fit: the chosen checkpoint is the **latest** epoch whose
    DEV risk is within one standard error (the lowest risk's own) of the lowest risk so far. DEV's epoch-to-epoch
    differences are often inside its noise; among checkpoints it cannot tell apart, the latest has trained
    longest with the adaptation loss at full strength.

    ``score`` turns that into one number per epoch that a checkpoint callback can rank (lower is better, ties go
    to the later epoch): the lowest risk so far for an epoch within one standard error of it, else the epoch's own
    risk, which is above the lowest by more than a standard error. The running minimum is the whole state
    (``state_dict``), so a resumed fit goes on choosing as the uninterrupted one would.
    """

    def __init__(self):
        self.lowest, self.lowest_se = math.inf, 0.0

    def score(self, risk: float, standard_error: float) -> float:
        if risk < self.lowest:
            self.lowest, self.lowest_se = risk, standard_error
        return self.lowest if risk <= self.lowest + self.lowest_se else risk

    def state_dict(self) -> dict:
        return {"lowest": self.lowest, "lowest_se": self.lowest_se}

    def load_state_dict(self, state: dict) -> None:
        self.lowest, self.lowest_se = float(state["lowest"]), float(state["lowest_se"])
