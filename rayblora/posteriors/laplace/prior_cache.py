"""What a prior-precision sweep needs of a Laplace-LoRA posterior, without the model (pure torch + numpy).

Laplace-LoRA (Yang et al., arXiv 2308.13111, sec. 3) gives, for prior precision δ, the GLM predictive
f(x) ~ N(f_θ*(x), J Σ_δ Jᵀ) and the evidence log p(D | δ). Neither needs a new forward or backward pass when δ
changes: J Σ_δ Jᵀ comes from the rotated per-example Jacobians and the curvature eigenvalues
(:func:`rayblora.posteriors.laplace.glm.functional_covariance`), the evidence from the eigenvalues, ‖θ*‖² and the
log-likelihood (:meth:`MemberLaplace.log_marglik`). :class:`PriorCache` holds exactly those for every fitted
member on the validation split — built once, at the cost of one validation pass of the GLM predictive (one
forward and C backward passes per batch) — and evaluates any δ from them.

It travels to Tune trials as flat numpy arrays plus JSON metadata (:meth:`to_arrays` / :meth:`from_arrays`):
Ray's object store holds one copy and the trials of a node read it zero-copy.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rayblora import metrics
from rayblora.data.batches import eval_batches
import rayblora.posteriors.laplace.glm as glm
from rayblora.posteriors.laplace.kfac import BlockEigen
from rayblora.posteriors.laplace.posterior import LaplacePosterior, MemberLaplace


@dataclass
class PriorCache:
    """Model-free inputs of the probit GLM predictive and the evidence on a validation split.

    fits: one MemberLaplace per fitted member (eigenbases, prior groups, ‖θ*‖², log-likelihood, n_data).
    batches: batches[m][b], member m's f_mu (B_b, C) and rotated Jacobians on validation batch b.
    labels: (N,) the validation labels, in batch order.
    """

    fits: list[MemberLaplace]
    batches: list[list[glm.GLMBatch]]
    labels: torch.Tensor

    @classmethod
    def from_posterior(cls, posterior: LaplacePosterior, dataset, batch_size: int) -> "PriorCache":
        """One pass over `dataset` (a split with prompt / label / num_choices) per fitted member."""
        scorer = posterior.scorer
        data = list(eval_batches(dataset, scorer.tokenizer, batch_size, scorer.max_length))
        batches = [[posterior.glm_batch(m, b) for b in data] for m in range(len(posterior.fits))]
        return cls(list(posterior.fits), batches, torch.cat([b["labels"] for b in data]))

    @property
    def num_examples(self) -> int:
        return int(self.labels.numel())

    def probs(self, prior: float) -> torch.Tensor:
        """(N, C) probit GLM predictive at scalar prior precision `prior` (every block, every fitted member),
        averaged over the fitted members (probabilities: docs/ARCHITECTURE.md, "aggregation")."""
        out = []
        for b in range(len(self.batches[0])):
            per_member = [glm.probit_probs(jac.f_mu, glm.functional_covariance(jac, fit.eigens,
                                                                               {k: prior for k in fit.eigens}))
                          for fit, jac in zip(self.fits, (member[b] for member in self.batches))]
            out.append(torch.stack(per_member).mean(0))
        return torch.cat(out)

    def log_marglik(self, prior: float) -> float:
        """Laplace evidence at scalar `prior`, averaged over the fitted members (each has its own evidence)."""
        return float(np.mean([fit.log_marglik(torch.full((fit.prior.numel(),), prior)) for fit in self.fits]))

    def evaluate(self, prior: float, n_bins: int = 15) -> dict[str, float]:
        """Validation NLL, ECE (`n_bins` equal-width bins), accuracy and the evidence at prior precision `prior`."""
        probs, labels = self.probs(prior).double().numpy(), self.labels.numpy()
        probs = probs / probs.sum(1, keepdims=True)
        return {"prior_precision": float(prior), "val_nll": metrics.nll(probs, labels),
                "val_ece": metrics.ece(probs, labels, n_bins), "val_accuracy": metrics.accuracy(probs, labels),
                "log_marglik": self.log_marglik(prior)}

    # --- transport ----------------------------------------------------------------------------------------
    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Flat numpy arrays (views of the tensors, no copy) and the JSON-able rest."""
        tensors: dict[str, torch.Tensor] = {"labels": self.labels}
        for m, (fit, batches) in enumerate(zip(self.fits, self.batches)):
            for key, eigen in fit.eigens.items():
                tensors.update(eigen.tensors(f"m{m}.{key}"))
            for b, jac in enumerate(batches):
                tensors[f"m{m}.b{b}.f_mu"] = jac.f_mu
                for key, block in jac.blocks.items():
                    tensors[f"m{m}.b{b}.{key}.rotated"] = block.rotated
                    if block.residual is not None:
                        tensors[f"m{m}.b{b}.{key}.residual"] = block.residual
        meta = {"batches": len(self.batches[0]),
                "blocks": {key: list(e.shape) for key, e in self.fits[0].eigens.items()},
                "fits": [{"member": f.member, "groups": f.groups, "prior": f.prior.tolist(), "n_data": f.n_data,
                          "log_lik": f.log_lik, "theta_sq": f.theta_sq, "prior_source": f.prior_source}
                         for f in self.fits]}
        return {k: v.detach().cpu().numpy() for k, v in tensors.items()}, meta

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> "PriorCache":
        """Rebuild from :meth:`to_arrays`, sharing the arrays' memory (read-only object-store memory included:
        nothing here writes to it)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")
            t = {k: torch.from_numpy(v) for k, v in arrays.items()}
        fits, batches = [], []
        for m, info in enumerate(meta["fits"]):
            eigens = {key: BlockEigen.from_tensors(t, f"m{m}.{key}", tuple(shape))
                      for key, shape in meta["blocks"].items()}
            fits.append(MemberLaplace(info["member"], eigens, info["groups"], torch.tensor(info["prior"]),
                                      info["n_data"], info["log_lik"], info["theta_sq"], info["prior_source"]))
            batches.append([glm.GLMBatch(t[f"m{m}.b{b}.f_mu"], {
                key: glm.BlockJacobians(t[f"m{m}.b{b}.{key}.rotated"], t.get(f"m{m}.b{b}.{key}.residual"))
                for key in meta["blocks"]}) for b in range(meta["batches"])])
        return cls(fits, batches, t["labels"])
