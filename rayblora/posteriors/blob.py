"""BLoB: Bayesian low-rank adaptation by backpropagation (Wang et al., NeurIPS 2024, arXiv 2406.11675).

The posterior over each adapted module's LoRA factors is asymmetric (paper sec. 3.2): A gets a mean-field
Gaussian q(A) = N(M, diag Ω²), B stays deterministic (it is trained, but as a point estimate). M is the LoRA
`lora_A` weight itself, so a member's adapter file holds the posterior mean; Ω = G² with G trained
(initialised U(ε/√2, ε), ε = `blob.init_std`, sec. 3.4). The prior is N(0, β² I), β = `blob.prior_std`.

Training maximises the ELBO with one flipout draw per forward (sec. 3.3; Wen et al., ICLR 2018): one noise
matrix E ~ N(0, I) of A's shape is shared by the batch and every token gets its own random signs s_in ∈ {±1}^k,
s_out ∈ {±1}^r, so the output of `lora_A` on an input x (the LoRA-dropped input, shape (..., k)) is

    A x + s_out ⊙ ((Ω ⊙ E) (s_in ⊙ x)),

an unbiased draw whose noise decorrelates across tokens. The KL term has the closed form

    KL(q ‖ p) = Σ_ij [ log(β / Ω_ij) + (Ω_ij² + M_ij²) / (2 β²) − ½ ],

weighted per step as the paper does (`blob.kl_weighting`): `uniform` gives every step of an epoch of M_e steps
the weight 1 / M_e (so an epoch's steps add up to one KL); `reweighted` gives step i of the epoch
2^(M_e − i) / (2^(M_e) − 1) (Blundell et al., ICML 2015, eq. 9), front-loading the prior. `blob.kl_weight`
scales either. As in the paper, the weighted KL gets its own plain SGD step on M and G after every optimizer step
(`blob.kl_lr`, following the run's lr schedule) while the run's optimizer takes the likelihood term; with
`blob.kl_lr = 0` the weighted KL is added to the loss instead.

Prediction: `blob` draws S weight-space samples A_s = M + Ω ⊙ E_s per member (S = `sampling.samples`, seeded by
`sampling.seed`, evaluated batched over states like every sampling family) and averages their softmaxes;
`blob_mean` is the paper's "mean" variant, the adapter at A = M (S = 1 per member).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, ClassVar, Iterator, Sequence

import torch
from torch import nn

from rayblora.config import BlobConfig, Config, ConfigError, SamplingConfig
from rayblora.posteriors.base import AdapterState, Posterior, SampledStatesPosterior
from rayblora.posteriors.laplace.kfac import find_lora_sites, state_key
from rayblora.train.checkpoint import read_hook_state
from rayblora.train.loop import lr_factor

HOOK_NAME = "blob"
BLOB_FILE = "blob.safetensors"


def gaussian_kl_to_isotropic(mean: torch.Tensor, std: torch.Tensor, prior_std: float) -> torch.Tensor:
    """KL(N(mean, diag std²) ‖ N(0, prior_std² I)), summed over all entries (same-shape tensors); a scalar."""
    var_ratio = (std / prior_std) ** 2
    return 0.5 * (var_ratio + (mean / prior_std) ** 2 - 1.0 - torch.log(var_ratio)).sum()


def kl_step_weight(weighting: str, step_in_epoch: int, steps_per_epoch: int) -> float:
    """The KL weight of the (0-based) `step_in_epoch`-th step of an epoch of `steps_per_epoch` steps."""
    if weighting == "uniform":
        return 1.0 / steps_per_epoch
    m, i = steps_per_epoch, step_in_epoch + 1
    if m > 60:  # 2^(M−i) / (2^M − 1) → 2^(−i) once 2^M dwarfs 1
        return 2.0 ** (-i)
    return 2.0 ** (m - i) / (2.0 ** m - 1.0)


class FlipoutNoise:
    """Forward hooks adding flipout noise s_out ⊙ ((Ω ⊙ E)(s_in ⊙ x)) to the output of each `lora_A` (module
    doc). E is drawn once per forward of the model (`new_draw`), the signs per token."""

    def __init__(self, lora_a: Sequence[nn.Linear]):
        self.lora_a = list(lora_a)
        self.stds: list[torch.Tensor] = []
        self.noise: list[torch.Tensor] = []

    def new_draw(self, stds: Sequence[torch.Tensor]) -> None:
        """A new E for the next forward, with `stds` the Ω (r, k) of the sites' A factors, in site order."""
        self.stds = list(stds)
        self.noise = [torch.randn(s.shape, device=s.device, dtype=s.dtype) for s in self.stds]

    @contextmanager
    def active(self) -> Iterator[None]:
        handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.lora_a)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _hook(self, site: int):
        def add_noise(_module, inputs, output):
            x = inputs[0]
            sign_in = torch.randint(0, 2, x.shape, device=x.device).to(x.dtype) * 2 - 1
            sign_out = torch.randint(0, 2, output.shape, device=x.device).to(output.dtype) * 2 - 1
            perturbation = (self.stds[site] * self.noise[site]).to(x.dtype)  # (r, k)
            return output + sign_out * ((x * sign_in) @ perturbation.T)
        return add_noise


class BlobTraining:
    """The BLoB training objective and step hook: trains LoRA A (= M), B and G (Ω = G²) on the ELBO."""

    def __init__(self, blob: BlobConfig, cfg_train):
        if cfg_train.strategy != "ddp":
            raise ConfigError(f"train.strategy: {HOOK_NAME} trains its variational parameters with the ddp "
                              f"strategy only, got {cfg_train.strategy!r}")
        self.blob, self.train = blob, cfg_train
        self.sites: list[str] = []
        self.lora_a: list[nn.Linear] = []
        self.g: nn.ParameterList | None = None
        self.flipout: FlipoutNoise | None = None
        self.train_size = 1
        self.lr_at = lr_factor(cfg_train)

    keeps_trunk_frozen: ClassVar[bool] = True
    """Only the LoRA modules change: the frozen trunk's hidden states (rayblora.trunk_cache) stay exact."""

    @classmethod
    def from_config(cls, cfg: Config) -> "BlobTraining":
        return cls(cfg.blob, cfg.train)

    def trainable_parameters(self, scorer) -> list[tuple[str, nn.Parameter]]:
        """The scorer's LoRA parameters and G per adapted module (seeded by the member's torch seed)."""
        sites = find_lora_sites(scorer.model)
        self.sites, self.lora_a = [s.name for s in sites], [s.lora_A for s in sites]
        eps = self.blob.init_std
        self.g = nn.ParameterList([nn.Parameter(torch.empty_like(a.weight, dtype=torch.float32)
                                                .uniform_(eps / math.sqrt(2.0), eps)) for a in self.lora_a])
        self.flipout = FlipoutNoise(self.lora_a)
        return list(scorer.lora_parameters()) + [(f"blob.{n}", g) for n, g in zip(self.sites, self.g)]

    def stds(self) -> list[torch.Tensor]:
        """Ω = G² per adapted module, shaped like its A (r, k)."""
        return [g * g for g in self.g]

    def logits(self, scorer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Answer logits (B, C) under one flipout draw (module doc)."""
        self.flipout.new_draw(self.stds())
        with self.flipout.active():
            return scorer.logits(batch)

    def kl(self) -> torch.Tensor:
        """KL(q(A) ‖ N(0, β² I)) over every adapted module (a scalar with grad in M and G)."""
        return sum(gaussian_kl_to_isotropic(a.weight.float(), g * g, self.blob.prior_std)
                   for a, g in zip(self.lora_a, self.g))

    def steps_per_epoch(self, train_size: int) -> int:
        """M_e: optimizer steps per pass over the N training examples."""
        return max(1, math.ceil(train_size / (self.train.batch_size * self.train.grad_accum)))

    def weighted_kl(self, step: int, train_size: int) -> torch.Tensor:
        """kl_weight · π_step · KL for the 0-based optimizer step `step` (π_step: module doc)."""
        m = self.steps_per_epoch(train_size)
        return self.blob.kl_weight * kl_step_weight(self.blob.kl_weighting, step % m, m) * self.kl()

    def regulariser(self, scorer, step: int, train_size: int) -> torch.Tensor:
        """The weighted KL / grad_accum in the loss (`blob.kl_lr = 0`); else 0 (the KL gets its own step)."""
        self.train_size = train_size
        if self.blob.kl_lr > 0:
            return torch.zeros((), device=self.g[0].device)
        return self.weighted_kl(step, train_size) / self.train.grad_accum

    def __call__(self, step: int, scorer) -> None:
        """After optimizer step `step` (1-based): with `blob.kl_lr > 0`, one SGD step of the weighted KL on M
        and G at kl_lr times the run's lr schedule (the second optimizer of the paper's training)."""
        if self.blob.kl_lr <= 0:
            return
        params = [a.weight for a in self.lora_a] + list(self.g)
        kl = self.weighted_kl(step - 1, self.train_size)
        grads = torch.autograd.grad(kl, params)
        rate = self.blob.kl_lr * self.lr_at(step - 1)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(rate * g.to(p.dtype))

    def state_dict(self) -> dict[str, Any]:
        return {"hook": HOOK_NAME, "sites": list(self.sites), "g": [g.detach().cpu() for g in self.g]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("hook") != HOOK_NAME or list(state["sites"]) != self.sites:
            raise ValueError(f"checkpointed hook state is not this {HOOK_NAME} adapter's")
        with torch.no_grad():
            for g, saved in zip(self.g, state["g"]):
                g.copy_(saved)


class BlobPosterior(SampledStatesPosterior):
    """BLoB: S draws of A ~ N(M, Ω²) per member (B fixed), mixed by the Bayesian model average."""

    method = "blob"
    needs_checkpoints = True
    collected_in_training = "the A variances learnt during training"
    carried_by = ("blob", "blob_mean")
    training_sections = ("blob",)
    mean_only: ClassVar[bool] = False
    """Predict at A = M (the paper's "mean" variant) instead of sampling."""

    def __init__(self, scorer, members, member_info=None, stds: Sequence[dict[str, torch.Tensor]] = (),
                 samples: int = SamplingConfig.samples, seed: int = SamplingConfig.seed):
        super().__init__(scorer, members, member_info)
        if len(stds) != len(self.members):
            raise ValueError(f"{self.method}: {len(stds)} sets of A standard deviations for {len(self.members)} "
                             "members")
        for k, (member, std) in enumerate(zip(self.members, stds)):
            for key, value in std.items():
                if key not in member or tuple(member[key].shape) != tuple(value.shape):
                    raise ValueError(f"{self.method}: member {k}'s Ω for {key} does not match its adapter")
        if samples < 1:
            raise ValueError(f"{self.method}: sampling.samples must be >= 1, got {samples}")
        self.stds, self.samples, self.seed = [dict(s) for s in stds], int(samples), int(seed)
        self.sample_states = list(self.members) if self.mean_only else [
            s for k in range(len(self.members)) for s in self._draws(k)]

    def _draws(self, member: int) -> list[AdapterState]:
        gen = torch.Generator().manual_seed(self.seed + 1000 * member)
        mean, std, out = self.members[member], self.stds[member], []
        for _ in range(self.samples):
            state = dict(mean)
            for key in sorted(std):
                noise = torch.randn(std[key].shape, generator=gen)
                state[key] = (mean[key].float() + std[key].float() * noise).to(mean[key].dtype)
            out.append(state)
        return out

    @classmethod
    def training_hooks(cls, cfg) -> list[BlobTraining]:
        """The BLoB objective (ELBO with flipout draws over A) each member trains with."""
        return [BlobTraining.from_config(cfg)]

    @classmethod
    def build(cls, scorer, members, member_info, data=None, config=None,
              member_dirs: Sequence[str] | None = None) -> "BlobPosterior":
        """From the members' adapters (A = M) and their final checkpoints (which hold G, Ω = G²)."""
        member_dirs = cls.checked_member_dirs(
            members, member_dirs, "needs the A variances learnt during training, and these members come without them "
            "(e.g. an ensemble artifact); train with posterior.method = blob | blob_mean and evaluate that artifact")
        stds = []
        for d in member_dirs:
            state = read_hook_state(d, HOOK_NAME)
            stds.append({state_key(f"{site}.lora_A"): (g.float() ** 2) for site, g in zip(state["sites"], state["g"])})
        sampling = config.sampling if config is not None else SamplingConfig()
        return cls(scorer, members, member_info, stds, sampling.samples, sampling.seed)

    @classmethod
    def from_artifact(cls, scorer, members, member_info, tensors, extra) -> "BlobPosterior":
        if BLOB_FILE not in tensors:
            raise ValueError(f"{cls.method} artifact has no {BLOB_FILE}")
        file, keys = tensors[BLOB_FILE], list(extra["a_keys"])
        stds = [{key: file[f"{k}.{key}"] for key in keys} for k in range(len(members))]
        return cls(scorer, members, member_info, stds, int(extra["samples"]), int(extra["seed"]))

    def artifact_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {BLOB_FILE: {f"{k}.{key}": v.float().contiguous() for k, std in enumerate(self.stds)
                            for key, v in std.items()}}

    def artifact_extra(self) -> dict[str, Any]:
        return {"a_keys": sorted(self.stds[0]), "samples": self.samples, "seed": self.seed,
                "mean_std": [float(torch.cat([v.reshape(-1) for v in s.values()]).mean()) for s in self.stds]}

    def _view(self, method: str, data=None, config=None) -> Posterior:
        """The other BLoB variant from the same Ω; any other family from the members (A = M)."""
        if method == self.method:
            return self
        if method in ("blob", "blob_mean"):
            sampling = config.sampling if config is not None else SamplingConfig(self.samples, self.seed)
            cls = BlobMeanPosterior if method == "blob_mean" else BlobPosterior
            return cls(self.scorer, self.members, self.member_info, self.stds, sampling.samples, sampling.seed)
        return super()._view(method, data=data, config=config)


class BlobMeanPosterior(BlobPosterior):
    """BLoB's "mean" variant: each member's adapter at A = M (S = 1 per member)."""

    method = "blob_mean"
    mean_only = True
