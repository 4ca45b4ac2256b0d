"""LoRA deep ensembles (Balabanov & Linander, arXiv 2402.12264; Wang et al., arXiv 2310.00035).

K independently initialised and trained LoRA adapters on one frozen base; the predictive averages the K
members' class probabilities. `map` is the single-adapter baseline: member 0 alone (K = 1).
"""

from __future__ import annotations

import torch

from rayblora.posteriors.base import Posterior


class EnsemblePosterior(Posterior):
    """Uniform mixture over the K member adapters; S = K."""

    method = "ensemble"

    def sample_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Answer logits (K, B, C), one row per member."""
        return self.scorer.logits_for_states(batch, self.members)


class MapPosterior(EnsemblePosterior):
    """The maximum-a-posteriori adapter alone: member 0 of whatever was trained (S = 1)."""

    method = "map"

    def __init__(self, scorer, members, member_info=None):
        super().__init__(scorer, list(members)[:1], list(member_info)[:1] if member_info else None)
