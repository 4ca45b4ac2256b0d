"""Bayesian hybrid PEFT (BH-PEFT, arXiv 2508.02711): LoRA + prefix + bottleneck adapter as mean-field Gaussians.

:mod:`.modules` adds the prefix / bottleneck modules, :mod:`.gaussian` the diagonal Gaussians, :mod:`.variational`
the training objective (ELBO, round-to-round prior), :mod:`.laplace_prior` the diagonal Laplace round prior and
:mod:`.posterior` the `hybrid_vi` family.
"""

from rayblora.posteriors.hybrid.posterior import HybridVIPosterior, MemberGaussian

__all__ = ["HybridVIPosterior", "MemberGaussian"]
