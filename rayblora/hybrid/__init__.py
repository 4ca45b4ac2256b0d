"""Bayesian hybrid adapters (BH-PEFT, arXiv 2508.02711): prefix and bottleneck modules attached to a LoRA
model (:mod:`rayblora.hybrid.modules`), diagonal Gaussian priors and KL terms (:mod:`rayblora.hybrid.gaussian`),
and the mean-field variational training objective (:mod:`rayblora.hybrid.variational`)."""
