"""Laplace-LoRA (Yang et al., arXiv 2308.13111): post-hoc Laplace approximation over the LoRA parameters.

:mod:`.kfac` accumulates the curvature (KFAC / diagonal GGN, low-rank where large), :mod:`.glm` is the
linearised predictive, :mod:`.posterior` the `laplace` / `laplace_ensemble` families (prior precision by
marginal likelihood or validation NLL), :mod:`.prior_cache` the validation cache the prior sweep evaluates.
"""

from rayblora.posteriors.laplace.posterior import (LAPLACE_FILE, PRIOR_GRID, LaplaceEnsemblePosterior,
                                                   LaplacePosterior, MemberLaplace, fit_curvature,
                                                   laplace_sites)

__all__ = ["LAPLACE_FILE", "PRIOR_GRID", "LaplaceEnsemblePosterior", "LaplacePosterior", "MemberLaplace",
           "fit_curvature", "laplace_sites"]
