"""The Bayesian model average and its uncertainty split.

Given S samples (ensemble members, SWAG / Laplace draws) of class probabilities p_s(y|x), the predictive is
their average p(y|x) = 1/S Σ_s p_s(y|x) (probabilities, never logits, are averaged: docs/ARCHITECTURE.md,
"aggregation"), and

    total entropy   H[p]                    = aleatoric + epistemic
    aleatoric       1/S Σ_s H[p_s]          (expected entropy)
    epistemic       H[p] − 1/S Σ_s H[p_s]   (mutual information between y and θ; ≥ 0 by Jensen)

(Wang et al., arXiv 2310.00035, sec. 3; Balabanov & Linander, arXiv 2402.12264, sec. 2).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch


def entropy(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats along `dim`, with 0·log 0 = 0."""
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(dim)


@dataclass
class Predictive:
    """Predictive distribution of a posterior on B inputs with C choices from S samples.

    probs: (B, C) averaged probabilities; sample_probs: (S, B, C); entropy, aleatoric,
    mutual_information: (B,) in nats. Where the posterior carries a feature density (:mod:`rayblora.density`):
    distance, log_density (B,) float and in_distribution (B,) bool; else None.
    """

    probs: torch.Tensor
    sample_probs: torch.Tensor
    entropy: torch.Tensor
    aleatoric: torch.Tensor
    mutual_information: torch.Tensor
    distance: torch.Tensor | None = None
    log_density: torch.Tensor | None = None
    in_distribution: torch.Tensor | None = None

    def _map(self, fn) -> "Predictive":
        """The same predictive with `fn` applied to every tensor field (None fields stay None)."""
        return Predictive(**{f.name: None if getattr(self, f.name) is None else fn(f.name, getattr(self, f.name))
                             for f in fields(self)})

    def rows(self, start: int, stop: int) -> "Predictive":
        """The predictive of inputs start..stop−1."""
        return self._map(lambda name, t: t[:, start:stop] if name == "sample_probs" else t[start:stop])

    def with_density(self, distance: torch.Tensor, log_density: torch.Tensor,
                     in_distribution: torch.Tensor) -> "Predictive":
        """This predictive with the feature-density scores (B,) of its inputs."""
        return replace(self, distance=distance, log_density=log_density, in_distribution=in_distribution)

    @property
    def confidence(self) -> torch.Tensor:
        """Max averaged probability (B,)."""
        return self.probs.max(-1).values

    @property
    def label(self) -> torch.Tensor:
        """Predicted class (B,)."""
        return self.probs.argmax(-1)

    def cpu(self) -> "Predictive":
        """The same predictive with every tensor in host memory (a no-op copy-free view on the CPU)."""
        return self._map(lambda _, t: t.cpu())


def from_sample_probs(sample_probs: torch.Tensor) -> Predictive:
    """Predictive from per-sample probabilities (S, B, C)."""
    if sample_probs.dim() != 3:
        raise ValueError(f"sample_probs must be (S, B, C), got shape {tuple(sample_probs.shape)}")
    sample_probs = sample_probs.float()
    probs = sample_probs.mean(0)
    total = entropy(probs)
    aleatoric = entropy(sample_probs).mean(0)
    mi = (total - aleatoric).clamp_min(0.0)
    return Predictive(probs, sample_probs, total, aleatoric, mi)


def from_logits(sample_logits: torch.Tensor) -> Predictive:
    """Predictive from per-sample logits (S, B, C) (−inf marks an invalid choice)."""
    return from_sample_probs(torch.softmax(sample_logits.float(), dim=-1))


def in_row_order(pred: Predictive, rows: torch.Tensor) -> Predictive:
    """The predictive of B inputs given in the order `rows` (B,) (input i is row rows[i]), in row order."""
    back = torch.argsort(rows)
    return pred._map(lambda name, t: t[:, back] if name == "sample_probs" else t[back])


def concat(parts: Sequence[Predictive]) -> Predictive:
    """Join predictives over consecutive batches along B."""
    if not parts:
        raise ValueError("no predictive batches to join")

    def joined(name: str) -> torch.Tensor | None:
        values = [getattr(p, name) for p in parts]
        if any(v is None for v in values):
            return None  # a field some batches lack (a density score) is dropped, never half-filled
        return torch.cat(values, dim=1 if name == "sample_probs" else 0)

    return Predictive(**{f.name: joined(f.name) for f in fields(Predictive)})


def greedy_selection(sample_probs: torch.Tensor, labels: torch.Tensor, size: int,
                     replacement: bool = False) -> tuple[list[int], list[float]]:
    """Ensemble selection by greedy forward steps (Caruana et al., ICML 2004, "Ensemble selection from
    libraries of models", sec. 2; the hyper-parameter ensembles of Wenzel et al., NeurIPS 2020, sec. 3).

    sample_probs: (M, N, C) each candidate's probabilities on N held-out rows; labels: (N,). Starting empty,
    each step adds the candidate whose addition gives the lowest NLL of the average of the chosen candidates'
    probabilities (ties go to the lower index), `size` steps in all; without `replacement` a candidate is chosen
    at most once. Returns (chosen indices in the order chosen, the NLL after each step)."""
    m = sample_probs.shape[0]
    if sample_probs.dim() != 3 or labels.shape != sample_probs.shape[1:2]:
        raise ValueError(f"greedy_selection: expected (M, N, C) probabilities and (N,) labels, got "
                         f"{tuple(sample_probs.shape)} and {tuple(labels.shape)}")
    if size < 1 or (not replacement and size > m):
        raise ValueError(f"greedy_selection: cannot choose {size} of {m} candidates without replacement")
    at_label = sample_probs.double().gather(2, labels.view(1, -1, 1).expand(m, -1, 1)).squeeze(2)  # (M, N)
    chosen: list[int] = []
    trace: list[float] = []
    total = torch.zeros(at_label.shape[1], dtype=torch.float64)
    for step in range(1, size + 1):
        nll = -((total + at_label) / step).clamp_min(1e-30).log().mean(1)  # (M,) NLL if each were added
        if not replacement:
            nll[chosen] = float("inf")
        best = int(torch.argmin(nll))
        chosen.append(best)
        trace.append(float(nll[best]))
        total += at_label[best]
    return chosen, trace
