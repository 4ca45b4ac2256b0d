"""Diagonal Gaussians over the flattened adapter parameters θ ∈ R^P: the prior of the variational objective
and the round-to-round prior of dynamic fine-tuning (BH-PEFT, arXiv 2508.02711, sec. 3.3).

Round t's posterior q_t = N(μ_t, diag σ_t²) becomes round t+1's prior N(μ_t, Λ_t⁻¹) with Λ_t = diag(c / σ_t²)
(c = `hybrid.prior_scale`). Its negative log density is, up to a constant, the quadratic penalty

    ½ (θ − μ_t)ᵀ Λ_t (θ − μ_t),

and the KL of the mean-field posterior q = N(m, diag s²) to it has the closed form

    KL(q ‖ p) = ½ Σ_i [ λ_i s_i² + λ_i (m_i − μ_i)² − 1 − log(λ_i s_i²) ],

whose m-dependent part is exactly the penalty at θ = m.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def inverse_softplus(sigma: torch.Tensor) -> torch.Tensor:
    """ρ with softplus(ρ) = σ (σ > 0), numerically stable for small and large σ."""
    return sigma + torch.log(-torch.expm1(-sigma))


def softplus_std(rho: torch.Tensor) -> torch.Tensor:
    """σ = softplus(ρ) (P,), the posterior standard deviation."""
    return F.softplus(rho)


@dataclass
class DiagonalGaussian:
    """N(mean, diag(precision)⁻¹) over P parameters; mean and precision are (P,) float tensors."""

    mean: torch.Tensor
    precision: torch.Tensor

    def __post_init__(self) -> None:
        if self.mean.shape != self.precision.shape or self.mean.dim() != 1:
            raise ValueError(f"Gaussian prior: mean {tuple(self.mean.shape)} and precision "
                             f"{tuple(self.precision.shape)} must be equal-length vectors")
        if not bool((self.precision > 0).all()):
            raise ValueError("Gaussian prior: every precision must be > 0")

    @classmethod
    def isotropic(cls, size: int, std: float) -> "DiagonalGaussian":
        """N(0, std² I) over `size` parameters."""
        return cls(torch.zeros(size), torch.full((size,), 1.0 / std ** 2))

    @classmethod
    def from_posterior(cls, mean: torch.Tensor, std: torch.Tensor, scale: float = 1.0) -> "DiagonalGaussian":
        """The round-to-round prior N(mean, diag(std²) / scale) of a diagonal posterior (mean, std (P,))."""
        return cls(mean.detach().clone().float(), scale / std.detach().float() ** 2)

    @property
    def size(self) -> int:
        return self.mean.numel()

    def penalty(self, theta: torch.Tensor) -> torch.Tensor:
        """½ (θ − μ)ᵀ Λ (θ − μ) for θ (P,): a scalar, differentiable in θ."""
        delta = theta - self.mean.to(theta)
        return 0.5 * (self.precision.to(theta) * delta * delta).sum()

    def kl_from(self, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """KL(N(mean, diag std²) ‖ self) (module docstring), a scalar differentiable in mean and std (P,)."""
        precision = self.precision.to(mean)
        var_ratio = precision * std * std
        trace_and_logdet = 0.5 * (var_ratio - 1.0 - torch.log(var_ratio)).sum()
        return self.penalty(mean) + trace_and_logdet

    def to(self, device: torch.device | str) -> "DiagonalGaussian":
        return DiagonalGaussian(self.mean.to(device), self.precision.to(device))
