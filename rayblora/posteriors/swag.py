"""SWAG-LoRA and MultiSWAG (Onal et al., arXiv 2405.03425; SWAG: Maddox et al., NeurIPS 2019, arXiv 1902.02476).

During training, a step hook collects, over the flattened LoRA parameters θ ∈ R^P of one trajectory, every
`swag.collect_every` steps from `swag.start_step` on (Maddox et al., sec. 4, alg. 1):

    θ̄  = 1/n Σ_i θ_i                 running mean (float64)
    θ²̄ = 1/n Σ_i θ_i²                running second moment (float64)
    D  = [θ_i − θ̄_i]_{last K}        deviation columns, θ̄_i the running mean after snapshot i (float32)

and, if `swag.swa_lr` > 0, replaces the learning rate from the start step on by a constant or cyclic SWA rate
(Izmailov et al. 2018, sec. 3.2). The moments are part of the member checkpoint (the hook's state dict), so a
resumed worker continues collection exactly where it stopped.

The posterior N(θ̄, ½ (Σ_diag + D Dᵀ / (K − 1))), Σ_diag = θ²̄ − θ̄², is sampled as (Maddox et al., eq. 1)

    θ̃ = θ̄ + c · ( Σ_diag^{1/2} z₁ / √2  +  D z₂ / √(2 (K − 1)) ),   z₁ ~ N(0, I_P), z₂ ~ N(0, I_K),

with c = `swag.scale` (the covariance is scaled by c²). Families:
* `swa`: the SWA mean θ̄ of trajectory 0 alone (S = 1), the single-model baseline.
* `swag`: S samples of trajectory 0.
* `multiswag`: S samples of each of the K trajectories (= ensemble members, one Ray Train run each),
  mixed into one Bayesian model average of K · S probability vectors (Wilson & Izmailov 2020, sec. 3.2).

Artifact: the member folders hold the SWA means (PEFT-loadable); `swag.safetensors` holds per trajectory t the
tensors `t.mean`, `t.sq_mean`, `t.deviations`, `t.count` and `t.final` (the last training iterate, which the
`map` / `ensemble` views of a SWAG artifact use).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch

from rayblora import predictive
from rayblora.config import ConfigError, SwagConfig, TrainConfig
from rayblora.posteriors.base import AdapterState, Posterior, SampledStatesPosterior
from rayblora.predictive import Predictive
from rayblora.registry import get_posterior_class
from rayblora.train.checkpoint import read_hook_state

SWAG_FILE = "swag.safetensors"
HOOK_NAME = "swag"


def flatten_state(state: AdapterState, keys: Sequence[str]) -> torch.Tensor:
    """θ (P,) float64: the tensors of `state` named by `keys`, flattened and concatenated in that order."""
    return torch.cat([state[k].detach().reshape(-1).to(torch.float64) for k in keys])


def unflatten_state(vector: torch.Tensor, template: AdapterState, keys: Sequence[str]) -> AdapterState:
    """Split θ (P,) back into tensors shaped and typed like `template[k]` for `k` in `keys`."""
    out, offset = {}, 0
    for k in keys:
        ref = template[k]
        out[k] = vector[offset:offset + ref.numel()].reshape(ref.shape).to(ref.dtype).clone()
        offset += ref.numel()
    if offset != vector.numel():
        raise ValueError(f"SWAG vector has {vector.numel()} entries, the adapter has {offset} parameters")
    return out


@dataclass
class SwagMoments:
    """SWAG statistics of one trajectory over P parameters.

    mean, sq_mean: (P,) float64; deviations: (k, P) float32, oldest first, k ≤ K; count: snapshots n.
    """

    mean: torch.Tensor
    sq_mean: torch.Tensor
    deviations: torch.Tensor
    count: int

    @classmethod
    def empty(cls, size: int) -> "SwagMoments":
        zeros = torch.zeros(size, dtype=torch.float64)
        return cls(zeros, zeros.clone(), torch.zeros(0, size, dtype=torch.float32), 0)

    def update(self, theta: torch.Tensor, max_rank: int) -> None:
        """Add snapshot θ (P,): running averages, then the deviation from the new mean (keep the last K)."""
        theta = theta.to(torch.float64)
        n = self.count + 1
        self.mean = self.mean + (theta - self.mean) / n
        self.sq_mean = self.sq_mean + (theta * theta - self.sq_mean) / n
        column = (theta - self.mean).to(torch.float32)[None]
        self.deviations = torch.cat([self.deviations, column])[-max_rank:]
        self.count = n

    @property
    def variance(self) -> torch.Tensor:
        """Σ_diag = θ²̄ − θ̄² (P,), clamped at 0 against round-off."""
        return (self.sq_mean - self.mean * self.mean).clamp_min(0.0)

    def covariance(self, scale: float = 1.0) -> torch.Tensor:
        """The dense SWAG covariance c² · ½ (Σ_diag + D Dᵀ / (K − 1)) (P, P); for tests and small P only."""
        cov = torch.diag(self.variance)
        k = self.deviations.shape[0]
        if k >= 2:
            d = self.deviations.to(torch.float64)
            cov = cov + d.T @ d / (k - 1)
        return 0.5 * scale ** 2 * cov

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.mean": self.mean, f"{prefix}.sq_mean": self.sq_mean,
                f"{prefix}.deviations": self.deviations,
                f"{prefix}.count": torch.tensor([self.count], dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> "SwagMoments":
        missing = [f"{prefix}.{n}" for n in ("mean", "sq_mean", "deviations", "count")
                   if f"{prefix}.{n}" not in tensors]
        if missing:
            raise ValueError(f"SWAG tensors lack {missing}")
        return cls(tensors[f"{prefix}.mean"].to(torch.float64), tensors[f"{prefix}.sq_mean"].to(torch.float64),
                   tensors[f"{prefix}.deviations"].to(torch.float32), int(tensors[f"{prefix}.count"].item()))


def sample_swag(moments: SwagMoments, num: int, generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """`num` draws θ̃ (num, P) float64 from the SWAG Gaussian (module docstring; Maddox et al., eq. 1).

    With fewer than two deviation columns the low-rank term is left out (it needs K − 1 ≥ 1).
    """
    if moments.count == 0:
        raise ValueError("no SWAG snapshot was collected: nothing to sample from")
    size = moments.mean.numel()
    z1 = torch.randn(num, size, generator=generator, dtype=torch.float64)
    draw = moments.variance.sqrt() * z1 / math.sqrt(2.0)
    k = moments.deviations.shape[0]
    if k >= 2:
        z2 = torch.randn(num, k, generator=generator, dtype=torch.float64)
        draw = draw + z2 @ moments.deviations.to(torch.float64) / math.sqrt(2.0 * (k - 1))
    return moments.mean + scale * draw


def swa_learning_rate(cfg: SwagConfig, start: int, peak_lr: float, next_step: int) -> float | None:
    """SWA learning rate of optimizer step `next_step` (1-based), or None to keep the configured schedule.

    constant: `swa_lr` for every step after `start`; cyclic: within each cycle of `collect_every` steps, linear
    from `peak_lr` down to `swa_lr`, reached at the step after which a snapshot is collected.
    """
    if cfg.swa_lr <= 0 or next_step <= start:
        return None
    if cfg.lr_schedule == "constant":
        return cfg.swa_lr
    frac = ((next_step - start - 1) % cfg.collect_every + 1) / cfg.collect_every
    return (1.0 - frac) * peak_lr + frac * cfg.swa_lr


def swag_start_step(cfg: SwagConfig, train: TrainConfig) -> int:
    """The first collection step: `swag.start_step`, or half of `train.steps` when it is 0."""
    start = cfg.start_step or max(1, train.steps // 2)
    if start > train.steps:
        raise ConfigError(f"swag.start_step: {start} is after the last step (train.steps = {train.steps}); "
                          "no SWAG snapshot would be collected")
    return start


class SwagCollector:
    """Training step hook that collects SWAG moments of the scorer's LoRA parameters (a `StepHook`)."""

    def __init__(self, cfg: SwagConfig, train: TrainConfig):
        self.cfg, self.start, self.peak_lr = cfg, swag_start_step(cfg, train), train.lr
        self.keys: list[str] = []
        self.moments: SwagMoments | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.stepper = None

    def bind(self, state) -> None:
        """Called by the training loop with its TrainerState: the SWA schedule sets `state.optimizer`'s lr,
        snapshots come from `state.stepper.adapter_state()` (gathered from ZeRO-3 partitions; collective)."""
        self.optimizer, self.stepper = state.optimizer, state.stepper

    def collects_at(self, step: int) -> bool:
        return step >= self.start and (step - self.start) % self.cfg.collect_every == 0

    def __call__(self, step: int, scorer) -> None:
        """After optimizer step `step`: collect a snapshot if due, then set the lr of step `step + 1`."""
        if self.collects_at(step):
            state = (self.stepper or scorer).adapter_state()
            if self.moments is None:
                self.keys = sorted(state)
                self.moments = SwagMoments.empty(sum(state[k].numel() for k in self.keys))
            self.moments.update(flatten_state(state, self.keys), self.cfg.max_rank)
        lr = swa_learning_rate(self.cfg, self.start, self.peak_lr, step + 1)
        if lr is not None and self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        """Tensors, strings and ints only (checkpoints are read with `weights_only=True`)."""
        state: dict[str, Any] = {"hook": HOOK_NAME, "keys": list(self.keys)}
        if self.moments is not None:
            state.update(self.moments.to_tensors("moments"))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("hook") != HOOK_NAME:
            raise ValueError(f"checkpointed hook state is not SWAG's (hook={state.get('hook')!r})")
        self.keys = list(state["keys"])
        self.moments = SwagMoments.from_tensors(state, "moments") if self.keys else None


def read_checkpoint_moments(directory: str | Path) -> tuple[list[str], SwagMoments]:
    """(parameter keys, moments) of the SWAG hook saved in a member checkpoint's trainer state."""
    try:
        state = read_hook_state(directory, HOOK_NAME)
    except KeyError:
        state = {"keys": []}
    if not state["keys"]:
        raise ValueError(f"{directory}: the checkpoint holds no SWAG moments (was the member trained with "
                         "posterior.method = swa | swag | multiswag, and did it reach swag.start_step?)")
    return list(state["keys"]), SwagMoments.from_tensors(state, "moments")


@dataclass
class Trajectory:
    """One SWAG trajectory: moments over the adapter parameters `keys` and its last iterate `final`."""

    keys: list[str]
    moments: SwagMoments
    final: AdapterState

    def __post_init__(self) -> None:
        if sorted(self.final) != self.keys:
            raise ValueError("SWAG moments and the member adapter have different parameter names")
        size = sum(self.final[k].numel() for k in self.keys)
        if size != self.moments.mean.numel():
            raise ValueError(f"SWAG moments cover {self.moments.mean.numel()} parameters, the adapter {size}")

    def mean_state(self) -> AdapterState:
        return unflatten_state(self.moments.mean, self.final, self.keys)

    def samples(self, num: int, seed: int, scale: float) -> list[AdapterState]:
        draws = sample_swag(self.moments, num, torch.Generator().manual_seed(seed), scale)
        return [unflatten_state(d, self.final, self.keys) for d in draws]


@dataclass(frozen=True)
class Sampling:
    """S samples per trajectory, deviation scale c, seed (trajectory t draws with seed + 1000 t)."""

    samples: int = SwagConfig.samples
    scale: float = SwagConfig.scale
    seed: int = SwagConfig.sample_seed

    @classmethod
    def from_config(cls, config) -> "Sampling":
        swag = config.swag if config is not None else SwagConfig()
        return cls(swag.samples, swag.scale, swag.sample_seed)


class SwagFamily(SampledStatesPosterior):
    """Shared machinery of `swa`, `swag` and `multiswag`: moments per trajectory, SWA-mean members."""

    needs_checkpoints = True
    collected_in_training = "the SWAG moments collected during training"
    carried_by = ("swa", "swag", "multiswag")
    training_sections = ("swag",)
    all_trajectories: ClassVar[bool] = False
    """Mix every trajectory (MultiSWAG) rather than trajectory 0 alone."""
    mean_only: ClassVar[bool] = False
    """Predict with the SWA mean instead of sampling."""

    def __init__(self, scorer, trajectories: Sequence[Trajectory], member_info: Sequence[dict[str, Any]] | None,
                 sampling: Sampling):
        self.trajectories, self.sampling = list(trajectories), sampling
        super().__init__(scorer, [t.mean_state() for t in self.trajectories], member_info)
        used = self.trajectories if self.all_trajectories else self.trajectories[:1]
        if self.mean_only:
            self.sample_states = [t.mean_state() for t in used]
        else:
            self.sample_states = [s for i, t in enumerate(used)
                                  for s in t.samples(sampling.samples, sampling.seed + 1000 * i, sampling.scale)]

    @classmethod
    def training_hooks(cls, cfg) -> list[SwagCollector]:
        """The SWAG moment collector run after every optimizer step of each trajectory."""
        return [SwagCollector(cfg.swag, cfg.train)]

    @classmethod
    def build(cls, scorer, members, member_info, data=None, config=None,
              member_dirs: Sequence[str] | None = None) -> "SwagFamily":
        """From the members' final iterates and their training checkpoints (which hold the moments)."""
        member_dirs = cls.checked_member_dirs(
            members, member_dirs, "needs the SWAG moments collected during training, and these members come without "
            "them (e.g. an ensemble artifact); train with posterior.method = swa | swag | multiswag and evaluate that "
            "artifact")
        trajectories = [Trajectory(*read_checkpoint_moments(d), final=dict(m)) for m, d in zip(members, member_dirs)]
        return cls(scorer, trajectories, member_info, Sampling.from_config(config))

    @classmethod
    def from_artifact(cls, scorer, members, member_info, tensors, extra) -> "SwagFamily":
        if SWAG_FILE not in tensors:
            raise ValueError(f"{cls.method} artifact has no {SWAG_FILE}")
        file, keys = tensors[SWAG_FILE], list(extra["param_keys"])
        if len(members) != int(extra["trajectories"]):
            raise ValueError(f"{cls.method} artifact: {len(members)} member folders for "
                             f"{extra['trajectories']} trajectories")
        trajectories = []
        for t, mean_state in enumerate(members):
            if sorted(mean_state) != keys:
                raise ValueError(f"{cls.method} artifact: member {t} has other adapter tensors than {SWAG_FILE}")
            final = unflatten_state(file[f"{t}.final"], mean_state, keys)
            trajectories.append(Trajectory(keys, SwagMoments.from_tensors(file, str(t)), final))
        sampling = Sampling(int(extra["samples"]), float(extra["scale"]), int(extra["sample_seed"]))
        return cls(scorer, trajectories, member_info, sampling)

    def artifact_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        tensors: dict[str, torch.Tensor] = {}
        for t, traj in enumerate(self.trajectories):
            tensors.update(traj.moments.to_tensors(str(t)))
            tensors[f"{t}.final"] = flatten_state(traj.final, traj.keys).to(torch.float32)
        return {SWAG_FILE: tensors}

    def artifact_extra(self) -> dict[str, Any]:
        return {"param_keys": self.trajectories[0].keys, "trajectories": len(self.trajectories),
                "counts": [t.moments.count for t in self.trajectories],
                "rank": [int(t.moments.deviations.shape[0]) for t in self.trajectories],
                "samples": self.sampling.samples, "scale": self.sampling.scale,
                "sample_seed": self.sampling.seed}

    def _view(self, method: str, data=None, config=None) -> Posterior:
        """Another SWAG family from the same moments; any other family from the final iterates (the MAPs)."""
        cls = get_posterior_class(method)
        if method == self.method:
            return self
        if issubclass(cls, SwagFamily):
            return cls(self.scorer, self.trajectories, self.member_info, self.sampling)
        return cls.build(self.scorer, [t.final for t in self.trajectories], self.member_info, data=data,
                         config=config)



class SwaPosterior(SwagFamily):
    """The SWA mean θ̄ of trajectory 0 (S = 1)."""

    method = "swa"
    mean_only = True


class SwagPosterior(SwagFamily):
    """SWAG-LoRA: S samples from trajectory 0's SWAG Gaussian."""

    method = "swag"


class MultiSwagPosterior(SwagFamily):
    """MultiSWAG: S samples from each of the K trajectories' SWAG Gaussians (K · S in all)."""

    method = "multiswag"
    all_trajectories = True
    provides = ("swag",)

    def predict_views(self, batch: dict[str, torch.Tensor]) -> dict[str, Predictive]:
        """multiswag and `swag` (trajectory 0's S draws: the same seed, so the same states) from one pass."""
        logits = self.sample_logits(batch)
        return {self.method: predictive.from_logits(logits),
                "swag": predictive.from_logits(logits[:self.sampling.samples])}
