"""`hybrid_vi`: the Bayesian hybrid adapter (BH-PEFT, arXiv 2508.02711, sec. 3), a mean-field Gaussian
posterior over LoRA + prefix + bottleneck adapter parameters trained by variational inference
(:mod:`rayblora.posteriors.hybrid.variational`).

Prediction draws S parameter vectors θ_s = μ + σ ⊙ ε_s per member (ε seeded by `hybrid.sample_seed`, so a
batch's prediction is reproducible) and averages the S · K answer softmaxes (the Bayesian model average).

Artifact: `members/<k>/` hold the LoRA part of member k's posterior mean (PEFT-loadable); `hybrid.safetensors`
holds per member k the flat tensors `k.mean` (μ), `k.rho` (ρ, σ = softplus(ρ)), `k.prior_mean` and
`k.prior_precision` (the prior it was trained against) and, with `hybrid.round_precision: laplace`,
`k.laplace_precision` (the next round's prior precision, :mod:`rayblora.posteriors.hybrid.laplace_prior`); the
manifest's family section names the tensors and the hybrid parts, so the prefix / bottleneck modules are rebuilt on
load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from rayblora.config import AdapterConfig, HybridConfig
from rayblora.posteriors.hybrid.gaussian import DiagonalGaussian, softplus_std
from rayblora.posteriors.hybrid.laplace_prior import diagonal_ggn
from rayblora.posteriors.hybrid.modules import HybridModules, set_active
from rayblora.posteriors.hybrid.variational import HOOK_NAME, HYBRID_FILE, VariationalAdapter, VariationalTraining
from rayblora.model import set_lora_state
from rayblora.posteriors.base import AdapterState, Posterior
from rayblora.train.checkpoint import read_hook_state

PARTS = ("lora", "prefix_tokens", "prefix_init_std", "bottleneck_dim")
"""HybridConfig fields that fix the adapter's shape (stored in the manifest)."""


@dataclass
class MemberGaussian:
    """One member's variational posterior and prior over the flat adapter tensors `names` (P,) each."""

    names: list[str]
    mean: torch.Tensor
    rho: torch.Tensor
    prior: DiagonalGaussian
    laplace_precision: torch.Tensor | None = None
    """Diagonal Laplace precision at `mean` (`hybrid.round_precision: laplace`), else None."""

    @classmethod
    def from_hook_state(cls, state: dict[str, Any]) -> "MemberGaussian":
        return cls(list(state["names"]), state["mean"].float(), state["rho"].float(),
                   DiagonalGaussian(state["prior_mean"].float(), state["prior_precision"].float()))

    @classmethod
    def from_tensors(cls, names: Sequence[str], tensors: dict[str, torch.Tensor], prefix: str) -> "MemberGaussian":
        return cls(list(names), tensors[f"{prefix}.mean"], tensors[f"{prefix}.rho"],
                   DiagonalGaussian(tensors[f"{prefix}.prior_mean"], tensors[f"{prefix}.prior_precision"]),
                   tensors.get(f"{prefix}.laplace_precision"))

    @property
    def std(self) -> torch.Tensor:
        return softplus_std(self.rho)

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.mean": self.mean, f"{prefix}.rho": self.rho, f"{prefix}.prior_mean": self.prior.mean,
               f"{prefix}.prior_precision": self.prior.precision}
        if self.laplace_precision is not None:
            out[f"{prefix}.laplace_precision"] = self.laplace_precision
        return out


class HybridVIPosterior(Posterior):
    """Mixture over K members of mean-field Gaussians over the hybrid adapter; S draws per member.

    `mean_only` predicts with each member's posterior mean instead (the `map` / `ensemble` views)."""

    method = HOOK_NAME
    needs_checkpoints = True
    collected_in_training = "the variational parameters (μ, ρ) and prior saved during training"
    training_sections = ("hybrid",)

    def __init__(self, scorer, members: Sequence[AdapterState], member_info, gaussians: Sequence[MemberGaussian],
                 hybrid: HybridConfig, layers: Sequence[int], mean_only: bool = False):
        super().__init__(scorer, members, member_info)
        if len(gaussians) != len(self.members):
            raise ValueError(f"{self.method}: {len(self.members)} members but {len(gaussians)} Gaussians")
        self.gaussians, self.hybrid, self.layers, self.mean_only = list(gaussians), hybrid, tuple(layers), mean_only
        modules = None
        if hybrid.prefix_tokens or hybrid.bottleneck_dim:  # own modules, active only in its own forwards
            modules = HybridModules(scorer.model, hybrid, AdapterConfig(layers=self.layers))
        set_active(scorer.model, None)  # e.g. a training scorer's modules: other views see plain LoRA
        self.adapters = [VariationalAdapter(scorer, modules, g.names, g.mean, g.rho) for g in self.gaussians]
        self.draws = [self._draws(k) for k in range(len(self.gaussians))]

    def _draws(self, k: int) -> list[torch.Tensor]:
        adapter = self.adapters[k]
        if self.mean_only:
            return [adapter.mean.detach()]
        generator = torch.Generator().manual_seed(self.hybrid.sample_seed + 1000 * k)
        with torch.no_grad():
            return [adapter.draw(generator) for _ in range(self.hybrid.samples)]

    @classmethod
    def training_hooks(cls, cfg) -> list[VariationalTraining]:
        """The variational objective (μ, ρ trained; KL to the prior or the previous round's posterior)."""
        return [VariationalTraining.from_config(cfg)]

    @classmethod
    def build(cls, scorer, members, member_info, data=None, config=None,
              member_dirs: Sequence[str] | None = None) -> "HybridVIPosterior":
        """From the members' training checkpoints, which hold μ, ρ and the prior (the hook's state)."""
        if member_dirs is None or config is None:
            raise ValueError(f"{cls.method}: needs the variational parameters saved during training and the run "
                             "config; train with posterior.method = hybrid_vi and evaluate that artifact")
        gaussians = [MemberGaussian.from_hook_state(read_hook_state(d, HOOK_NAME)) for d in member_dirs]
        posterior = cls(scorer, members, member_info, gaussians, config.hybrid, config.adapter.layers)
        if config.hybrid.round_precision == "laplace":
            if data is None:
                raise ValueError(f"{cls.method}: hybrid.round_precision=laplace needs the training split")
            posterior.fit_laplace_precision(data.train)
        return posterior

    def fit_laplace_precision(self, train_split) -> None:
        """Each member's diagonal Laplace precision at its mean: its prior precision + the GGN diagonal of
        `train_split` (:mod:`rayblora.posteriors.hybrid.laplace_prior`), stored with the artifact for the next round."""
        def progress(done: int, total: int) -> None:
            if done % 64 == 0 or done == total:
                print(f"[{self.method}] Laplace precision: {done}/{total} training prompts", flush=True)

        for state, adapter, gaussian in zip(self.members, self.adapters, self.gaussians):
            set_lora_state(self.scorer.model, state)
            ggn = diagonal_ggn(adapter, train_split, self.scorer, progress)
            gaussian.laplace_precision = gaussian.prior.precision + ggn.cpu()

    @classmethod
    def from_artifact(cls, scorer, members, member_info, tensors, extra) -> "HybridVIPosterior":
        if HYBRID_FILE not in tensors:
            raise ValueError(f"{cls.method} artifact has no {HYBRID_FILE}")
        file, names = tensors[HYBRID_FILE], extra["names"]
        gaussians = [MemberGaussian.from_tensors(names[k], file, str(k)) for k in range(len(members))]
        hybrid = HybridConfig(**{p: extra["parts"][p] for p in PARTS}, samples=int(extra["samples"]),
                              sample_seed=int(extra["sample_seed"]))
        return cls(scorer, members, member_info, gaussians, hybrid, extra["layers"])

    def artifact_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        tensors: dict[str, torch.Tensor] = {}
        for k, g in enumerate(self.gaussians):
            tensors.update(g.to_tensors(str(k)))
        return {HYBRID_FILE: tensors}

    def artifact_extra(self) -> dict[str, Any]:
        return {"names": [g.names for g in self.gaussians], "parts": {p: getattr(self.hybrid, p) for p in PARTS},
                "layers": list(self.layers), "samples": self.hybrid.samples, "sample_seed": self.hybrid.sample_seed,
                "mean_std": [float(g.std.mean()) for g in self.gaussians]}

    def _view(self, method: str, data=None, config=None) -> Posterior:
        """`map` / `ensemble`: the posterior mean of member 0 / of every member (hybrid parts included);
        other families: built from the members' LoRA means alone (no prefix / bottleneck)."""
        if method == self.method:
            return self
        if method in ("map", "ensemble"):
            keep = 1 if method == "map" else len(self.members)
            return HybridVIPosterior(self.scorer, self.members[:keep], self.member_info[:keep],
                                     self.gaussians[:keep], self.hybrid, self.layers, mean_only=True)
        return super()._view(method, data=data, config=config)

    generative = False
    feature_density = False  # its prefix / bottleneck modules change the features the members' LoRA forward reads

    def generation_states(self):
        raise ValueError(f"{self.method}: its prefix / bottleneck parts are not LoRA states the decoder can "
                         "stack; generation covers the LoRA families (ensemble, swag, laplace, mc_dropout, tfb, blob)")

    @property
    def num_samples(self) -> int:
        return sum(len(d) for d in self.draws)

    @torch.no_grad()
    def sample_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Answer logits (K · S, B, C): every draw of every member, one forward each of the layers from the first
        adapted one up; the frozen layers below run once for all draws (:mod:`rayblora.trunk`)."""
        out = []
        with self.scorer.restoring_adapter():
            trunk = self.scorer.shared_trunk(batch)
            if trunk is not None and trunk[0] > min(self.layers, default=0):
                trunk = None  # a prefix / bottleneck module below the first LoRA layer
            for state, adapter, draws in zip(self.members, self.adapters, self.draws):
                set_lora_state(self.scorer.model, state)  # the LoRA slot when the LoRA part is not variational
                out += [adapter.logits(batch, theta, trunk) for theta in draws]
        return torch.stack(out)
