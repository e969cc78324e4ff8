"""Losses shared by the transfer methods.

Domain adaptation after Tzeng, Hoffman, Darrell & Saenko, "Simultaneous Deep Transfer Across Domains and
Tasks" (ICCV 2015): the domain-confusion loss (cross-entropy of the domain classifier's prediction against the
*uniform* domain distribution) and the soft-label loss (cross-entropy of the target prediction at temperature
τ against per-class mean source predictions). The unsupervised variant uses the gradient-reversal layer and the
λ_p schedule of Ganin & Lempitsky, "Unsupervised Domain Adaptation by Backpropagation" (ICML 2015, DANN).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from tl_lightning.errors import TLError


def confusion_loss(domain_logits: torch.Tensor, domains: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cross-entropy between the domain classifier's softmax and the uniform distribution over its D domains,
    ``-1/D Σ_d log q_d`` (Tzeng et al. 2015, eq. 3); equals ``log D`` at uniform q. Averaged over the batch, or,
    given the samples' ``domains``, with each domain weighted 1/D (``domain_balanced_mean``)."""
    per_sample = -F.log_softmax(domain_logits, dim=-1).mean(dim=-1)
    if domains is None:
        return per_sample.mean()
    return domain_balanced_mean(per_sample, domains, domain_logits.shape[-1])


def domain_balanced_mean(per_sample: torch.Tensor, domains: torch.Tensor, num_domains: int = 2) -> torch.Tensor:
    """Mean of per-sample losses in which every domain present weighs the same (``1/D``), whatever its share of
    the batch: with k labelled targets per class the target half of a step outnumbers the source, and a plain
    mean would let the domain classifier win by predicting "target"."""
    counts = torch.bincount(domains, minlength=num_domains).to(per_sample)
    present = counts > 0
    weights = torch.where(present, 1.0 / (counts.clamp(min=1) * present.sum()), counts)
    return (per_sample * weights[domains]).sum()


def domain_loss(domain_logits: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
    """L_D: the domain classifier's cross-entropy, each domain weighted 1/D (``domain_balanced_mean``)."""
    return domain_balanced_mean(F.cross_entropy(domain_logits, domains, reduction="none"), domains,
                                domain_logits.shape[-1])


def soft_label_loss(logits: torch.Tensor, soft_targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy ``-Σ_k l_k log p_k`` of ``p = softmax(logits / τ)`` against soft labels ``l`` (one row per
    sample; Tzeng et al. 2015, eq. 5)."""
    return -(soft_targets * F.log_softmax(logits / temperature, dim=-1)).sum(dim=-1).mean()


def class_soft_labels(logits: torch.Tensor, targets: torch.Tensor, num_classes: int,
                      temperature: float = 1.0) -> torch.Tensor:
    """Per-class soft labels: row ``k`` is the mean of ``softmax(logits / τ)`` over the samples of class ``k``
    (the source examples, scored by a source-trained model; Tzeng et al. 2015, sec. 3.3)."""
    probs = F.softmax(logits.float() / temperature, dim=-1)
    counts = torch.bincount(targets, minlength=num_classes).to(probs)
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        raise TLError(f"cannot compute soft labels: the source data has no sample of class {missing[0]}; "
                      "use a source set that covers every class.")
    sums = torch.zeros(num_classes, probs.shape[1], dtype=probs.dtype, device=probs.device)
    sums.index_add_(0, targets, probs)
    return sums / counts[:, None]


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lambda_: float) -> torch.Tensor:
        ctx.lambda_ = lambda_
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.lambda_ * grad, None


def grad_reverse(x: torch.Tensor, lambda_: float = 1.0) -> torch.Tensor:
    """Identity on the forward pass; multiplies the gradient by ``-λ`` on the backward pass (DANN's GRL)."""
    return _GradientReversal.apply(x, float(lambda_))


class GradientReversal(torch.nn.Module):
    """The gradient-reversal layer as a module; set ``lambda_`` as training progresses."""

    def __init__(self, lambda_: float = 1.0):
        super().__init__()
        self.lambda_ = lambda_

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grad_reverse(x, self.lambda_)


def dann_lambda(progress: float, gamma: float = 10.0) -> float:
    """DANN's adaptation-weight schedule ``λ_p = 2 / (1 + exp(-γ p)) - 1`` for training progress ``p`` in [0, 1]."""
    p = min(max(float(progress), 0.0), 1.0)
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


# ----- class-incremental learning (iCaRL, Rebuffi et al. CVPR 2017; knowledge distillation, Hinton et al. 2015)


def icarl_targets(targets: torch.Tensor, old_logits: torch.Tensor, num_old: int, num_seen: int) -> torch.Tensor:
    """iCaRL's sigmoid targets over the ``num_seen`` classes seen so far (Alg. 3): the old classes ``< num_old``
    take the frozen previous model's sigmoid outputs (distillation), the new classes are one-hot."""
    one_hot = F.one_hot(targets, num_seen).to(old_logits.dtype)
    if num_old > 0:
        one_hot[:, :num_old] = torch.sigmoid(old_logits[:, :num_old])
    return one_hot


def icarl_loss(logits: torch.Tensor, targets: torch.Tensor, old_logits: torch.Tensor | None,
               num_old: int) -> torch.Tensor:
    """Binary cross-entropy of the seen classes' sigmoid outputs ``logits`` (B, num_seen) against
    :func:`icarl_targets` (iCaRL's representation update); without an old model it is plain one-hot BCE."""
    num_seen = logits.shape[1]
    if old_logits is None:
        num_old = 0
        old_logits = logits.detach()
    target = icarl_targets(targets, old_logits.detach(), num_old, num_seen)
    return F.binary_cross_entropy_with_logits(logits, target)


def distillation_loss(logits: torch.Tensor, old_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015): ``τ²`` times the cross-entropy of ``softmax(logits / τ)``
    against the frozen model's ``softmax(old_logits / τ)``, over the old classes' logits."""
    soft = F.softmax(old_logits.detach().float() / temperature, dim=-1)
    return temperature ** 2 * soft_label_loss(logits.float(), soft, temperature)
