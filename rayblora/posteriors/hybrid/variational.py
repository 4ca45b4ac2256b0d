"""Mean-field Gaussian variational inference over the hybrid adapter (BH-PEFT, arXiv 2508.02711, sec. 3.2).

The trainable tensors of the hybrid adapter (LoRA A/B, prefix keys/values, bottleneck weights), flattened in
a fixed order into θ ∈ R^P, get the posterior q(θ) = N(μ, diag σ²), σ = softplus(ρ). Training maximises the
ELBO per example with one reparameterised draw per step (Blundell et al. 2015, "Bayes by Backprop"):

    loss = − 1/B Σ_b log softmax(f_θ̃(x_b))[y_b]  +  kl_weight · KL(q ‖ p) / N,    θ̃ = μ + σ ⊙ ε,  ε ~ N(0, I),

over the C-way answer softmax f (Laplace-LoRA's scoring, arXiv 2308.13111, sec. 4), N the training-set size.
The prior p is N(0, prior_std² I) in the first round and the previous round's posterior afterwards
(:mod:`rayblora.posteriors.hybrid.gaussian`). A draw is evaluated with `torch.func.functional_call`, which
substitutes the drawn tensors for the model's own for one forward, so gradients reach μ and ρ.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn


from rayblora.config import AdapterConfig, Config, ConfigError, HybridConfig
from rayblora.manifest import ArtifactError, open_artifact
from rayblora.posteriors.hybrid.gaussian import DiagonalGaussian, inverse_softplus, softplus_std
from rayblora.posteriors.hybrid.modules import HybridModules, active, set_active

HOOK_NAME = "hybrid_vi"
HYBRID_FILE = "hybrid.safetensors"


class _ScorerForward(nn.Module):
    """Container whose parameter names address the adapter: `peft.<PEFT name>` and `hybrid.<module name>`."""

    def __init__(self, scorer, modules: HybridModules | None):
        super().__init__()
        self.scorer = scorer
        self.peft = scorer.model
        self.hybrid = modules if modules is not None else nn.Module()

    def forward(self, batch: dict[str, torch.Tensor], trunk: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
        return self.scorer.logits(batch, trunk)


def adapter_tensor_names(scorer, modules: HybridModules | None, lora: bool) -> list[str]:
    """Names (container naming) of the tensors the posterior covers, in flattening order."""
    names = [f"peft.{n}" for n, _ in scorer.lora_parameters()] if lora else []
    if modules is not None:
        names += [f"hybrid.{n}" for n, _ in modules.named_parameters()]
    return names


class VariationalAdapter(nn.Module):
    """q(θ) = N(μ, diag softplus(ρ)²) over the named adapter tensors of one scorer.

    Attributes: `mean` (μ) and `rho` (ρ), (P,) float32 parameters; `names` / `shapes` say how θ splits.
    """

    def __init__(self, scorer, modules: HybridModules | None, names: Sequence[str], mean: torch.Tensor,
                 rho: torch.Tensor):
        super().__init__()
        self.forward_module = _ScorerForward(scorer, modules)
        params = dict(self.forward_module.named_parameters(remove_duplicate=False))
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(f"hybrid_vi: the model has no adapter tensor {missing[0]!r}")
        self.names = list(names)
        self.shapes = [tuple(params[n].shape) for n in self.names]
        size = sum(params[n].numel() for n in self.names)
        if mean.shape != (size,) or rho.shape != (size,):
            raise ValueError(f"hybrid_vi: mean {tuple(mean.shape)} / rho {tuple(rho.shape)} do not match the "
                             f"adapter's {size} parameters")
        device = params[self.names[0]].device
        self.mean = nn.Parameter(mean.detach().to(device, torch.float32).clone())
        self.rho = nn.Parameter(rho.detach().to(device, torch.float32).clone())

    @classmethod
    def at_current_values(cls, scorer, modules, names: Sequence[str], init_std: float) -> "VariationalAdapter":
        """μ = the model's current adapter values, σ = `init_std` everywhere."""
        params = dict(_ScorerForward(scorer, modules).named_parameters(remove_duplicate=False))
        mean = torch.cat([params[n].detach().reshape(-1).float() for n in names])
        rho = inverse_softplus(torch.full_like(mean, init_std))
        return cls(scorer, modules, names, mean, rho)

    @property
    def std(self) -> torch.Tensor:
        """σ = softplus(ρ) (P,)."""
        return softplus_std(self.rho)

    def draw(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """θ̃ = μ + σ ⊙ ε (P,), differentiable in μ and ρ; ε from `generator` (default: torch's global RNG)."""
        noise = torch.randn(self.mean.shape, generator=generator, device="cpu").to(self.mean.device)
        return self.mean + self.std * noise

    def split(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """θ (P,) as the named adapter tensors."""
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes):
            n = int(torch.Size(shape).numel())
            out[name] = theta[offset:offset + n].view(shape)
            offset += n
        return out

    def logits(self, batch: dict[str, torch.Tensor], theta: torch.Tensor,
               trunk: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Answer logits (B, C) with the adapter tensors set to θ (P,) for this one forward (with this adapter's
        hybrid modules active); `trunk` from `scorer.shared_trunk(batch)` skips the frozen layers below it."""
        hybrid = self.forward_module.hybrid
        with active(self.forward_module.peft, hybrid if isinstance(hybrid, HybridModules) else None):
            return torch.func.functional_call(self.forward_module, self.split(theta), (batch,), {"trunk": trunk},
                                              strict=False)

    @torch.no_grad()
    def write(self, theta: torch.Tensor) -> None:
        """Copy θ (P,) into the model's own adapter tensors (e.g. μ, so the LoRA slot holds the mean)."""
        params = dict(self.forward_module.named_parameters(remove_duplicate=False))
        for name, value in self.split(theta.detach()).items():
            params[name].copy_(value.to(params[name].dtype))


def prior_from_artifact(path: str, round_precision: str = "variational"
                        ) -> tuple[list[str], torch.Tensor, DiagonalGaussian]:
    """(tensor names, σ_t (P,), N(μ_t, Λ_t⁻¹)) of member 0 of a hybrid_vi artifact, its checksums verified.

    μ_t and σ_t initialise the next round's posterior; N(μ_t, (hybrid.prior_scale · Λ_t)⁻¹) is its prior
    (:mod:`rayblora.posteriors.hybrid.gaussian`), with Λ_t = 1 / σ_t² (`variational`) or the artifact's diagonal Laplace
    precision (`laplace`, :mod:`rayblora.posteriors.hybrid.laplace_prior`).
    """
    try:
        artifact = open_artifact(path)
    except ArtifactError as exc:
        raise ConfigError(f"hybrid.prior_artifact: {exc}") from None
    root = artifact.root
    if artifact.method != HOOK_NAME or HYBRID_FILE not in artifact.tensors:
        raise ConfigError(f"hybrid.prior_artifact: {root} is a {artifact.method!r} posterior; the round prior "
                          f"needs a {HOOK_NAME} artifact")
    tensors = artifact.tensors[HYBRID_FILE]
    names, mean = list(artifact.manifest["family"]["names"][0]), tensors["0.mean"]
    std = softplus_std(tensors["0.rho"])
    if round_precision == "variational":
        return names, std, DiagonalGaussian.from_posterior(mean, std)
    if "0.laplace_precision" not in tensors:
        raise ConfigError(f"hybrid.round_precision: laplace needs the Laplace precision in {root}; train that "
                          "round with hybrid.round_precision=laplace too")
    return names, std, DiagonalGaussian(mean.float(), tensors["0.laplace_precision"].float())


class VariationalTraining:
    """The hybrid_vi training objective and step hook.

    The training loop asks it for the trained parameters (μ, ρ), the logits of each micro-batch (a fresh draw
    θ̃) and the regulariser kl_weight · KL(q ‖ p) / N. After every optimizer step it
    writes μ into the model, so checkpoints' adapter.safetensors (and the artifact's member folders) hold the
    LoRA posterior mean. Its state (μ, ρ, prior) is checkpointed with the member.
    """

    keeps_trunk_frozen = False
    """Prefix tokens and bottleneck adapters may sit below the first LoRA layer: no trunk cache."""

    def __init__(self, hybrid: HybridConfig, adapter: AdapterConfig, strategy: str = "ddp"):
        if strategy != "ddp":
            raise ConfigError(f"train.strategy: {HOOK_NAME} trains its variational parameters with the ddp "
                              f"strategy only, got {strategy!r}")
        self.hybrid, self.adapter = hybrid, adapter
        self.previous = (prior_from_artifact(hybrid.prior_artifact, hybrid.round_precision)
                         if hybrid.prior_artifact else None)
        self.q: VariationalAdapter | None = None
        self.prior: DiagonalGaussian | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> "VariationalTraining":
        return cls(cfg.hybrid, cfg.adapter, cfg.train.strategy)

    def trainable_parameters(self, scorer) -> list[tuple[str, nn.Parameter]]:
        """Build and activate the hybrid modules on the member's model (validation sees them too), set up q
        and the prior; returns [(name, μ), (name, ρ)]."""
        modules = None
        if self.hybrid.prefix_tokens or self.hybrid.bottleneck_dim:
            modules = HybridModules(scorer.model, self.hybrid, self.adapter)
        set_active(scorer.model, modules)
        names = adapter_tensor_names(scorer, modules, self.hybrid.lora)
        self.q = VariationalAdapter.at_current_values(scorer, modules, names, self.hybrid.init_std)
        self.prior = DiagonalGaussian.isotropic(self.q.mean.numel(), self.hybrid.prior_std)
        if self.previous is not None:
            self._continue_from_previous(names)
        self.prior = self.prior.to(self.q.mean.device)
        self.q.write(self.q.mean)
        return [("hybrid_vi.mean", self.q.mean), ("hybrid_vi.rho", self.q.rho)]

    def _continue_from_previous(self, names: list[str]) -> None:
        old_names, std, previous = self.previous
        if old_names != names or previous.size != self.q.mean.numel():
            raise ConfigError("hybrid.prior_artifact: its adapter tensors differ from this run's (same model, "
                              "adapter and hybrid sections are needed across rounds)")
        with torch.no_grad():
            self.q.mean.copy_(previous.mean)
            self.q.rho.copy_(inverse_softplus(std))
        if self.hybrid.round_prior:
            self.prior = DiagonalGaussian(previous.mean, self.hybrid.prior_scale * previous.precision)

    def logits(self, scorer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Answer logits (B, C) under one reparameterised draw θ̃ ~ q."""
        return self.q.logits(batch, self.q.draw())

    def regulariser(self, scorer, step: int, train_size: int) -> torch.Tensor:
        """kl_weight · KL(q ‖ p) / N: the per-example share of the whole training set's KL."""
        return self.hybrid.kl_weight * self.prior.kl_from(self.q.mean, self.q.std) / train_size

    def __call__(self, step: int, scorer) -> None:
        self.q.write(self.q.mean)

    def state_dict(self) -> dict[str, Any]:
        """Tensors, strings and ints only (checkpoints are read with `weights_only=True`)."""
        return {"hook": HOOK_NAME, "names": list(self.q.names), "mean": self.q.mean.detach().cpu(),
                "rho": self.q.rho.detach().cpu(), "prior_mean": self.prior.mean.cpu(),
                "prior_precision": self.prior.precision.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("hook") != HOOK_NAME or list(state["names"]) != self.q.names:
            raise ValueError(f"checkpointed hook state is not this {HOOK_NAME} adapter's")
        with torch.no_grad():
            self.q.mean.copy_(state["mean"])
            self.q.rho.copy_(state["rho"])
        self.prior = DiagonalGaussian(state["prior_mean"], state["prior_precision"]).to(self.q.mean.device)
        self.q.write(self.q.mean)
