"""Training-free Bayesianization of trained LoRA adapters (TFB; Shi et al., arXiv 2412.05723).

TFB turns a trained adapter into a Gaussian without a gradient step (paper sec. 3):

* **Low-rank isotropic variance** (sec. 3.2). For each adapted module, ΔW = B A with B (d, r) and A (r, k).
  The SVD B = U diag(D) Vᵀ gives the equivalent factors B' = U diag(D) and A' = Vᵀ A (B' A' = B A). The
  posterior keeps B' fixed and draws A'_ij ~ N(A'_ij, σ² / D_i²), so the weight noise B' (A'_s − A') = σ U E
  (E standard normal) is isotropic with variance σ² inside the column space of B. A direction with D_i = 0
  gets no noise (its B' column is zero): the std is σ / (D_i + `SINGULAR_FLOOR`).
* **σ by search** (sec. 3.3, Alg. 1). σ is the largest value whose validation performance stays within a
  tolerance of the adapter's own (σ = 0): the drop is the relative NLL increase (`tfb.metric: nll`) or the
  absolute accuracy loss (`accuracy`). The search bisects [`tfb.sigma_min`, `tfb.sigma_max`] geometrically
  for `tfb.search_steps` steps (one validation pass each, after one pass at σ = 0); every pass reuses the same
  standard-normal draws (common random numbers), so the drop changes only through σ. Only forward passes
  over the validation split run; the training split is never read.

`tfb` Bayesianizes the MAP adapter (member 0); `tfb_ensemble` every member, each with its own σ, and mixes
their S samples each. The number of predictive samples S and their seed are `sampling.samples` / `sampling.seed`,
the sampling settings every sampling family shares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch

from rayblora import metrics, predictive
from rayblora.config import SamplingConfig, TfbConfig
from rayblora.data.batches import eval_batches
from rayblora.posteriors.base import AdapterState, SampledStatesPosterior

SINGULAR_FLOOR = 1e-6
"""Added to the singular values of B before dividing σ by them (the paper's 1e-6)."""
A_SUFFIX, B_SUFFIX = "lora_A.weight", "lora_B.weight"


def lora_factor_pairs(state: AdapterState) -> list[tuple[str, str]]:
    """(A key, B key) of every adapted module of a PEFT adapter state, in key order."""
    pairs = []
    for key in sorted(state):
        if key.endswith(A_SUFFIX):
            b_key = key[:-len(A_SUFFIX)] + B_SUFFIX
            if b_key not in state:
                raise ValueError(f"tfb: adapter has {key} but no {b_key}")
            pairs.append((key, b_key))
    if not pairs:
        raise ValueError("tfb: the adapter state has no LoRA factors (no '*lora_A.weight' keys)")
    return pairs


@dataclass
class LowRankFactors:
    """One adapter in TFB's parameterisation: `state` with B' = U diag(D) and A' = Vᵀ A in place of B and A (the
    same ΔW), and `inverse_singular` A key -> 1 / (D + floor), shape (r, 1), the per-row noise scale of A'."""

    state: AdapterState
    inverse_singular: dict[str, torch.Tensor]

    @classmethod
    def from_state(cls, state: AdapterState) -> "LowRankFactors":
        out, scales = dict(state), {}
        for a_key, b_key in lora_factor_pairs(state):
            a, b = state[a_key].float(), state[b_key].float()
            u, d, vh = torch.linalg.svd(b, full_matrices=False)  # b (d_out, r) = u diag(d) vh
            out[b_key] = (u * d).to(state[b_key].dtype)
            out[a_key] = (vh @ a).to(state[a_key].dtype)
            scales[a_key] = (1.0 / (d + SINGULAR_FLOOR)).unsqueeze(1)
        return cls(out, scales)

    def standard_draws(self, num: int, seed: int) -> list[dict[str, torch.Tensor]]:
        """`num` standard-normal draws E shaped like each A' (one generator seeded by `seed`)."""
        gen = torch.Generator().manual_seed(seed)
        return [{k: torch.randn(self.state[k].shape, generator=gen) for k in sorted(self.inverse_singular)}
                for _ in range(num)]

    def samples(self, sigma: float, draws: Sequence[dict[str, torch.Tensor]]) -> list[AdapterState]:
        """Adapter states A'_s = A' + σ E / (D + floor), B' unchanged, one per draw."""
        out = []
        for draw in draws:
            state = dict(self.state)
            for key, scale in self.inverse_singular.items():
                noise = (sigma * scale * draw[key]).to(state[key].dtype)
                state[key] = self.state[key] + noise
            out.append(state)
        return out


def largest_within_tolerance(drop: Callable[[float], float], tolerance: float, low: float, high: float,
                             steps: int) -> tuple[float, list[tuple[float, float]]]:
    """The largest σ in [low, high] with drop(σ) ≤ tolerance, by `steps` geometric bisection steps.

    Assumes the σ within tolerance form an interval starting at `low` (the drop grows with σ past some point).
    Returns (σ, [(σ tried, its drop), ...]); σ is `low` if no tried value was within tolerance, and the
    largest value that was otherwise (`high` is never tried: the bisection approaches it).
    """
    if not 0 < low < high:
        raise ValueError(f"tfb: need 0 < sigma_min < sigma_max, got {low}, {high}")
    best, trace = low, []
    lo, hi = math.log(low), math.log(high)
    for _ in range(steps):
        mid = math.exp((lo + hi) / 2)
        value = float(drop(mid))
        trace.append((mid, value))
        if value <= tolerance:
            best, lo = max(best, mid), math.log(mid)
        else:
            hi = math.log(mid)
    return best, trace


def performance_drop(metric: str, reference: dict[str, float], probs: torch.Tensor,
                     labels: torch.Tensor) -> float:
    """Validation performance lost against `reference` (the σ = 0 figures): relative NLL increase for
    `metric="nll"`, absolute accuracy loss for `"accuracy"`. probs (N, C), labels (N,)."""
    p, y = probs.double().numpy(), labels.numpy()
    if metric == "nll":
        return (metrics.nll(p, y) - reference["nll"]) / max(reference["nll"], 1e-12)
    return reference["accuracy"] - metrics.accuracy(p, y)


def _validation_figures(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    p, y = probs.double().numpy(), labels.numpy()
    return {"nll": metrics.nll(p, y), "accuracy": metrics.accuracy(p, y)}


class TfbPosterior(SampledStatesPosterior):
    """TFB on the MAP adapter (member 0): S samples of its low-rank isotropic Gaussian with σ from the search."""

    method = "tfb"
    needs_data = True
    post_hoc = "build"
    all_members: ClassVar[bool] = False
    """Bayesianize every member (tfb_ensemble) rather than member 0 alone."""

    def __init__(self, scorer, members, member_info=None, sigmas: Sequence[float] = (0.0,),
                 samples: int = SamplingConfig.samples, seed: int = SamplingConfig.seed,
                 search: Sequence[dict[str, Any]] = ()):
        used = list(members) if self.all_members else list(members)[:1]
        info = None if member_info is None else (list(member_info) if self.all_members else list(member_info)[:1])
        super().__init__(scorer, used, info)
        if len(sigmas) != len(self.members):
            raise ValueError(f"{self.method}: {len(sigmas)} σ values for {len(self.members)} members")
        if samples < 1:
            raise ValueError(f"{self.method}: sampling.samples must be >= 1, got {samples}")
        if any(not (s >= 0 and math.isfinite(s)) for s in sigmas):
            raise ValueError(f"{self.method}: every σ must be finite and >= 0, got {list(sigmas)}")
        self.sigmas, self.samples, self.seed = [float(s) for s in sigmas], int(samples), int(seed)
        self.search = list(search)
        self.factors = [LowRankFactors.from_state(m) for m in self.members]
        self.sample_states = [s for i, f in enumerate(self.factors)
                              for s in f.samples(self.sigmas[i], f.standard_draws(self.samples, self._seed(i)))]

    def _seed(self, member: int) -> int:
        return self.seed + 1000 * member

    @classmethod
    def build(cls, scorer, members, member_info, data=None, config=None,
              batch_size: int = 16) -> "TfbPosterior":
        """Search σ per used member on `data.validation` (forward passes only), then draw the S samples."""
        if data is None:
            raise ValueError(f"{cls.method}: needs data (its validation split) to choose σ")
        tcfg = config.tfb if config is not None else TfbConfig()
        sampling = config.sampling if config is not None else SamplingConfig()
        used = list(members) if cls.all_members else list(members)[:1]
        batches = list(eval_batches(data.validation, scorer.tokenizer, batch_size, scorer.max_length,
                                    by_length=True))
        sigmas, search = [], []
        for i, member in enumerate(used):
            sigma, record = search_sigma(scorer, LowRankFactors.from_state(member), batches, tcfg,
                                         seed=sampling.seed + 1000 * i)
            sigmas.append(sigma)
            search.append({"member": i, **record})
        return cls(scorer, members, member_info, sigmas, sampling.samples, sampling.seed, search)

    @classmethod
    def from_artifact(cls, scorer, members, member_info, tensors, extra) -> "TfbPosterior":
        return cls(scorer, members, member_info, [float(s) for s in extra["sigmas"]], int(extra["samples"]),
                   int(extra["seed"]), extra.get("search", []))

    def artifact_extra(self) -> dict[str, Any]:
        return {"sigmas": self.sigmas, "samples": self.samples, "seed": self.seed, "search": self.search}



class TfbEnsemblePosterior(TfbPosterior):
    """TFB on every member (each its own σ), mixing all K·S samples."""

    method = "tfb_ensemble"
    all_members = True


@torch.no_grad()
def search_sigma(scorer, factors: LowRankFactors, batches: Sequence[dict[str, torch.Tensor]], tcfg: TfbConfig,
                 seed: int) -> tuple[float, dict[str, Any]]:
    """σ for one adapter (paper Alg. 1): one validation pass at σ = 0, then `tcfg.search_steps` bisection passes
    of `tcfg.search_samples` draws each. Returns (σ, a JSON-able record of the search)."""
    labels = torch.cat([b["labels"] for b in batches])
    draws = factors.standard_draws(tcfg.search_samples, seed)

    def validation_probs(sigma: float) -> torch.Tensor:
        states = factors.samples(sigma, draws) if sigma > 0 else [factors.state]
        return torch.cat([predictive.from_logits(scorer.logits_for_states(b, states)).probs.cpu()
                          for b in batches])

    reference = _validation_figures(validation_probs(0.0), labels)
    sigma, trace = largest_within_tolerance(
        lambda s: performance_drop(tcfg.metric, reference, validation_probs(s), labels),
        tcfg.tolerance, tcfg.sigma_min, tcfg.sigma_max, tcfg.search_steps)
    return sigma, {"sigma": sigma, "reference": reference, "metric": tcfg.metric, "tolerance": tcfg.tolerance,
                   "trace": [[s, d] for s, d in trace], "passes": 1 + len(trace),
                   "at_sigma_max": all(d <= tcfg.tolerance for _, d in trace),
                   "at_sigma_min": all(d > tcfg.tolerance for _, d in trace)}
