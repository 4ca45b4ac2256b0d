"""Sampling and calibration baselines on the MAP adapter (member 0).

* `mc_dropout` (Gal & Ghahramani, ICML 2016, sec. 3): LoRA dropout stays on at test time; the S stochastic
  passes are S samples of an approximate posterior, mixed by the Bayesian model average. The S passes run as
  one batched forward (:mod:`rayblora.batched`): each row block draws its own dropout masks.
* `temperature` (Guo et al., ICML 2017, sec. 4.2): the MAP's answer logits divided by one temperature T > 0
  fitted on the validation split by minimising the NLL (L-BFGS over log T, so T stays positive).
* `temperature_ensemble`: every member's logits divided by one T, fitted on the validation NLL of their
  average p = 1/K Σ_k softmax(f_k / T) (the members' disagreement, so the mutual information, survives).

The number of MC-dropout passes S and their seed are `sampling.samples` and `sampling.seed`, the prediction-time
draws TFB and BLoB share.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from rayblora import predictive
from rayblora.batched import lora_dropout_rate
from rayblora.config import SamplingConfig
from rayblora.data.batches import eval_batches
from rayblora.posteriors.base import Posterior
from rayblora.predictive import Predictive

FINITE_FLOOR = -1e4
"""Invalid choices (−inf logits) are floored here while fitting T, so their zero gradient stays finite."""


class McDropoutPosterior(Posterior):
    """S passes of the MAP adapter with LoRA dropout on (needs adapter.dropout > 0)."""

    method = "mc_dropout"

    def __init__(self, scorer, members, member_info=None, samples: int = SamplingConfig.samples,
                 seed: int = SamplingConfig.seed):
        super().__init__(scorer, list(members)[:1], list(member_info)[:1] if member_info else None)
        rate = lora_dropout_rate(scorer.model)
        if rate <= 0.0:
            raise ValueError("mc_dropout: the adapter has no LoRA dropout (adapter.dropout = 0); train with "
                             "adapter.dropout > 0 (e.g. 0.1) to use MC dropout")
        if samples < 1:
            raise ValueError(f"mc_dropout: sampling.samples must be >= 1, got {samples}")
        self.samples, self.seed, self.rate = samples, seed, rate

    @classmethod
    def build(cls, scorer, members, member_info, data=None, config=None) -> "McDropoutPosterior":
        sampling = config.sampling if config is not None else SamplingConfig()
        return cls(scorer, members, member_info, sampling.samples, sampling.seed)

    @classmethod
    def from_artifact(cls, scorer, members, member_info, tensors, extra) -> "McDropoutPosterior":
        return cls(scorer, members, member_info, int(extra["samples"]), int(extra["seed"]))

    def artifact_extra(self) -> dict[str, Any]:
        return {"samples": self.samples, "seed": self.seed, "dropout": self.rate}

    @property
    def num_samples(self) -> int:
        return self.samples

    generation_lora_dropout = True

    def generation_states(self):
        """The MAP adapter S times; with LoRA dropout on, each copy's rows draw their own masks at every step."""
        return self.members * self.samples

    def sample_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Answer logits (S, B, C) of S dropout passes; the masks are seeded, so a batch's result repeats."""
        device = next(self.scorer.model.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            return self.scorer.logits_for_states(batch, self.members * self.samples, lora_dropout=True)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """T > 0 minimising the NLL of 1/K Σ_k softmax(logits_k / T) (logits (N, C), or (K, N, C) for K members;
    labels (N,)), by L-BFGS over log T."""
    # one scalar, fitted on the CPU in float64: in float32 the NLL is flat to rounding over a range of T wide
    # enough that logits equal to 1e-7 gave temperatures 1e-4 apart
    logits = logits.detach().double().cpu().clamp_min(FINITE_FLOOR)
    logits, labels = (logits[None] if logits.dim() == 2 else logits), labels.cpu()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")
    log_k = torch.log(torch.tensor(float(logits.shape[0]), dtype=torch.float64))

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        log_mean = torch.logsumexp(F.log_softmax(logits / log_t.exp(), -1), 0) - log_k  # (N, C)
        loss = F.nll_loss(log_mean, labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not torch.isfinite(torch.tensor(temperature)):
        raise RuntimeError("temperature fit diverged (non-finite T)")
    return temperature


class TemperaturePosterior(Posterior):
    """The MAP adapter with its logits divided by a temperature fitted on the validation split (S = 1)."""

    method = "temperature"
    needs_data = True
    scaled_members: int | None = 1
    """How many members are scaled (the first n; None = all)."""

    def __init__(self, scorer, members, member_info=None, temperature: float = 1.0):
        n = self.scaled_members
        super().__init__(scorer, list(members)[:n], list(member_info)[:n] if member_info else None)
        if not temperature > 0:
            raise ValueError(f"temperature: must be > 0, got {temperature}")
        self.temperature = float(temperature)

    @classmethod
    def build(cls, scorer, members, member_info, data=None, config=None,
              batch_size: int = 16) -> "TemperaturePosterior":
        """Fit T on `data.validation` with the scaled members' logits."""
        if data is None:
            raise ValueError(f"{cls.method}: needs data (its validation split) to fit the temperature")
        mapped = cls(scorer, members, member_info)
        logits, labels = [], []
        for batch in eval_batches(data.validation, scorer.tokenizer, batch_size, scorer.max_length, by_length=True):
            logits.append(mapped.sample_logits(batch))
            labels.append(batch["labels"])
        mapped.temperature = fit_temperature(torch.cat(logits, 1), torch.cat(labels))
        return mapped

    generative = False

    def generation_states(self):
        raise ValueError(f"{self.method}: its temperature rescales the C answer logits and has no meaning for "
                         "generated text; generate from the `map` or `ensemble` view of these members")

    @classmethod
    def from_artifact(cls, scorer, members, member_info, tensors, extra) -> "TemperaturePosterior":
        return cls(scorer, members, member_info, float(extra["temperature"]))

    def artifact_extra(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    def sample_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Answer logits (n, B, C) of the scaled members divided by T."""
        return self.scorer.logits_for_states(batch, self.members) / self.temperature

    def rescale(self, member_probs: torch.Tensor) -> Predictive:
        """This predictive from the unscaled members' probabilities (K, B, C), e.g. an ensemble's pass:
        softmax(log p_k / T) = softmax(f_k / T), since log p_k and f_k differ by a per-row constant."""
        probs = member_probs[:self.scaled_members]
        logs = torch.where(probs > 0, probs.clamp_min(1e-30).log(), torch.full_like(probs, float("-inf")))
        return predictive.from_logits(logs / self.temperature)


class TemperatureEnsemblePosterior(TemperaturePosterior):
    """Every member's logits divided by one temperature fitted on the validation NLL of their average."""

    method = "temperature_ensemble"
    scaled_members = None
