"""Diagonal Laplace precision of a hybrid_vi round: the data-driven round-to-round prior
(`hybrid.round_precision: laplace`).

The mean-field posterior's σ moves slowly from its initial value in a short round, so N(μ_t, diag σ_t²) says more
about `hybrid.init_std` than about the data. The Laplace alternative (Laplace-LoRA, arXiv 2308.13111, sec. 3, with
a diagonal instead of K-FAC structure, over every hybrid part) puts the curvature of round t's data at its mean:

    Λ_t = Λ_prior,t + Σ_n diag(J_nᵀ H_n J_n),      J_n = ∂ f_θ(x_n) / ∂θ at θ = μ_t (C, P),
                                                    H_n = diag(p_n) − p_n p_nᵀ (C, C), the softmax Hessian,

the generalised Gauss-Newton (= Fisher) diagonal of the round's training split plus the precision of the prior
the round was trained against, so the precisions add up over rounds (Laplace propagation). Round t+1's prior is
N(μ_t, (prior_scale · Λ_t)⁻¹).
"""

from __future__ import annotations

from typing import Callable

import torch

from rayblora.data.batches import eval_batches
from rayblora.posteriors.laplace.kfac import ggn_columns


def diagonal_ggn(adapter, dataset, scorer, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Σ_n diag(J_nᵀ H_n J_n) (P,) at θ = μ of `adapter` (a VariationalAdapter) over `dataset`'s prompts.

    One example per forward (the diagonal needs per-example Jacobians) and C − 1 backward passes each, one for a
    binary answer; the frozen layers below the adapter get no gradient. Answers the prompt does not offer
    (-inf logits) have p = 0 and add nothing.
    """
    theta = adapter.mean.detach().clone().requires_grad_(True)
    total = torch.zeros_like(theta)
    with scorer.restoring_adapter():
        for n, batch in enumerate(eval_batches(dataset, scorer.tokenizer, 1, scorer.max_length)):
            logits = adapter.logits(batch, theta)
            safe = torch.where(torch.isfinite(logits), logits, logits.detach().new_zeros(()))
            columns = ggn_columns(logits.detach())  # (C−1, 1, C), L Lᵀ = H
            for k, column in enumerate(columns):
                (grad,) = torch.autograd.grad((safe * column).sum(), theta, retain_graph=k + 1 < len(columns))
                total += grad.detach() ** 2
            if progress is not None:
                progress(n + 1, len(dataset))
    return total
