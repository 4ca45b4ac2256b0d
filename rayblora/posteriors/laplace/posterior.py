"""Laplace-LoRA posteriors (Yang et al., arXiv 2308.13111): `laplace` and `laplace_ensemble`.

`laplace` puts a Gaussian N(θ*, (curvature + δ I)⁻¹) on the LoRA parameters of the MAP adapter (member 0);
`laplace_ensemble` is a mixture of Laplaces, one per ensemble member, whose predictive averages the members'
GLM predictives (probabilities: docs/ARCHITECTURE.md, "aggregation"). Curvature:
:mod:`rayblora.posteriors.laplace.kfac`; predictive and evidence: :mod:`rayblora.posteriors.laplace.glm`.

Predictive (`laplace.link`):
* probit: `probs` is the probit approximation of each member's GLM predictive, averaged over members;
  `sample_probs` holds `link_samples` Monte Carlo draws of f ~ N(f_mu, J Σ Jᵀ) per member (softmaxed) so the
  uncertainty split is defined: aleatoric = mean entropy of the draws, mutual information =
  max(0, H[probs] − aleatoric).
* mc: `probs` is the mean of the draws (the plain Monte Carlo GLM predictive).
* nn: weight-space samples θ ~ N(θ*, Σ) evaluated through the network (`link_samples` forward passes).
Every draw comes from a generator seeded by `laplace.sample_seed`, so a batch's prediction is reproducible.

With :meth:`LaplacePosterior.enable_jacobian_cache`, each batch's f_mu and rotated Jacobians are kept (keyed by the
batch's tokens), and :meth:`with_prior_precision` returns a posterior that shares them: re-evaluating the
predictive for a new δ then costs no forward or backward pass (the prior sweep uses this).
"""

from __future__ import annotations

import dataclasses
import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from rayblora import predictive
from rayblora.config import Config, LaplaceConfig, config_from_dict
from rayblora.data.batches import eval_batches
from rayblora.model import set_lora_state
from rayblora.posteriors.base import Posterior
import rayblora.posteriors.laplace.glm as glm
from rayblora.posteriors.laplace.kfac import BlockEigen, LoraCurvature, block_modules, find_lora_sites, state_key
from rayblora.predictive import Predictive

LAPLACE_FILE = "laplace.safetensors"
PRIOR_GRID = tuple(10.0 ** (k / 4) for k in range(-16, 17))
"""δ values tried by `prior_method: val_nll` (10⁻⁴ … 10⁴, four per decade)."""


@dataclass
class MemberLaplace:
    """The Laplace approximation around one member's adapter.

    eigens: block -> curvature eigen-structure; groups: block -> index into `prior` (one group = scalar δ,
    one per adapted module = per-module δ); prior (G,): the prior precision; theta_sq: block -> ‖θ*_b‖².
    """

    member: int
    eigens: dict[str, BlockEigen]
    groups: dict[str, int]
    prior: torch.Tensor
    n_data: int
    log_lik: float
    theta_sq: dict[str, float]
    prior_source: str = "fixed"

    def block_prior(self) -> dict[str, float]:
        return {k: float(v) for k, v in glm.block_prior(self.prior, self.groups).items()}

    def log_marglik(self, prior: torch.Tensor | None = None) -> float:
        p = self.prior if prior is None else prior
        delta = glm.block_prior(p.double(), self.groups)
        return float(glm.log_marginal_likelihood(self.log_lik, self.eigens, self.theta_sq, delta))

    def info(self) -> dict[str, Any]:
        return {"member": self.member, "n_data": self.n_data, "log_lik": self.log_lik,
                "prior_precision": self.prior.tolist(), "prior_method": self.prior_source,
                "log_marglik": self.log_marglik()}


def prior_groups(blocks: Sequence[str], per_module: bool) -> dict[str, int]:
    """Block -> prior group: all 0 (scalar δ), or one group per adapted module (its lora_A and lora_B)."""
    modules = list(dict.fromkeys(b.rsplit(".", 1)[0] for b in blocks))
    return {b: modules.index(b.rsplit(".", 1)[0]) if per_module else 0 for b in blocks}


def squared_norms(state: dict[str, torch.Tensor], blocks: Sequence[str]) -> dict[str, float]:
    """‖θ*_b‖² of each block from an adapter state (PEFT saved-file naming)."""
    try:
        return {b: float(state[state_key(b)].double().pow(2).sum()) for b in blocks}
    except KeyError as exc:
        raise KeyError(f"adapter state lacks LoRA tensor {exc}; was it trained with this adapter config?") from None


@contextmanager
def grads_only_for(model: torch.nn.Module, modules: dict[str, torch.nn.Linear]) -> Iterator[None]:
    """Freeze every LoRA weight outside `modules` (so backward stops at the earliest block used)."""
    keep = {id(m.weight) for m in modules.values()}
    frozen = [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad and id(p) not in keep]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def fit_batches(dataset, scorer, batch_size: int, limit: int) -> Iterator[dict[str, torch.Tensor]]:
    """The curvature's batches of a split: the first `limit` in row order, or (0) the whole split, a sum over its
    examples, with rows of similar length batched together (:func:`~rayblora.data.batches.eval_batches`)."""
    for i, batch in enumerate(eval_batches(dataset, scorer.tokenizer, batch_size, scorer.max_length,
                                           by_length=not limit)):
        if limit and i >= limit:
            return
        yield batch


def laplace_sites(model: torch.nn.Module, lcfg: LaplaceConfig):
    """The LoRA sites the `laplace` section puts the approximation on (`subset`, `factors`)."""
    return find_lora_sites(model, lcfg.subset, lcfg.factors)


def fit_curvature(scorer, state: dict[str, torch.Tensor], dataset, lcfg: LaplaceConfig, batch_size: int,
                  rank: int = 0, world: int = 1) -> LoraCurvature:
    """Accumulate the curvature of one adapter over this worker's shard (batches i with i % world == rank)."""
    with scorer.restoring_adapter():
        set_lora_state(scorer.model, state)
        sites = laplace_sites(scorer.model, lcfg)
        curv = LoraCurvature(sites, lcfg.structure, lcfg.hessian, lcfg.low_rank_threshold, lcfg.low_rank)
        with grads_only_for(scorer.model, curv.modules), torch.enable_grad():
            for i, batch in enumerate(fit_batches(dataset, scorer, batch_size, lcfg.fit_batches)):
                if i % world == rank:
                    curv.accumulate(scorer.logits, batch)
    return curv


def member_laplace(member: int, curv: LoraCurvature, state: dict[str, torch.Tensor],
                   lcfg: LaplaceConfig) -> MemberLaplace:
    """Eigendecompose a finished curvature; the prior is `lcfg.prior_precision` or its evidence maximiser."""
    eigens = curv.eigen()
    groups = prior_groups(list(eigens), lcfg.per_module)
    fit = MemberLaplace(member, eigens, groups, torch.full((max(groups.values()) + 1,), lcfg.prior_precision),
                        curv.n_data, curv.log_lik, squared_norms(state, list(eigens)))
    if lcfg.prior_method == "marglik":
        fit.prior, _ = glm.optimise_prior(fit.log_lik, eigens, fit.theta_sq, groups, lcfg.prior_precision)
        fit.prior_source = "marglik"
    return fit


def _batch_key(batch: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha1()
    for name in ("input_ids", "attention_mask", "segments", "num_choices"):
        if name in batch:
            h.update(name.encode())
            h.update(batch[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _predictive(probs: torch.Tensor, sample_probs: torch.Tensor) -> Predictive:
    """Predictive with given averaged probs (B, C) and draws (S, B, C): aleatoric from the draws."""
    total = predictive.entropy(probs)
    aleatoric = predictive.entropy(sample_probs).mean(0)
    return Predictive(probs, sample_probs, total, aleatoric, (total - aleatoric).clamp_min(0.0))


class LaplacePosterior(Posterior):
    """Laplace approximation on the MAP adapter (member 0); every member is kept in the artifact.

    Args:
        fits: one :class:`MemberLaplace` per fitted member.
        settings: the `laplace` config section (structure, subset, link, samples, seed, ...).
        fit_meta: JSON-able facts about the fit (seconds, workers) for the manifest.
    """

    method = "laplace"
    needs_data = True
    post_hoc = "curvature"
    fits_every_member = False

    def __init__(self, scorer, members, member_info, fits: Sequence[MemberLaplace], settings: LaplaceConfig,
                 fit_meta: dict[str, Any] | None = None):
        super().__init__(scorer, members, member_info)
        if not fits:
            raise ValueError(f"{self.method}: no fitted member Laplace approximations")
        self.fits, self.settings = list(fits), settings
        self.fit_meta = dict(fit_meta or {})
        self.modules = block_modules(laplace_sites(scorer.model, settings))
        for fit in self.fits:
            if list(fit.eigens) != list(self.modules):
                raise ValueError(f"{self.method}: the curvature blocks of member {fit.member} do not match the "
                                 f"model's LoRA modules (laplace.subset={settings.subset!r}, "
                                 f"laplace.factors={settings.factors!r})")
        self._cache: dict[tuple[int, str], glm.GLMBatch] | None = None

    # --- construction -------------------------------------------------------------------------------
    @classmethod
    def fitted_members(cls, n_members: int) -> list[int]:
        """Indices of the members that get a Laplace approximation."""
        return list(range(n_members)) if cls.fits_every_member else [0]

    @classmethod
    def build(cls, scorer, members, member_info, data=None, config: Config | None = None) -> "LaplacePosterior":
        """Fit in this process: one pass over `data.train` per fitted member (`data.validation` for val_nll)."""
        if data is None:
            raise ValueError(f"{cls.method}: needs the task data (data.train for the curvature)")
        cfg = config or Config()
        curvatures = {i: cls.curvature_pass(scorer, members[i], data.train, cfg)
                      for i in cls.fitted_members(len(members))}
        return cls.from_curvatures(scorer, members, member_info, curvatures, cfg, data.validation)

    @classmethod
    def curvature_pass(cls, scorer, member, train, config, rank: int = 0, world: int = 1) -> LoraCurvature:
        """KFAC / diagonal GGN of one adapter over this worker's shard of the training split (sec. 3 of the paper:
        the Hessian of the log-likelihood approximated at the MAP)."""
        return fit_curvature(scorer, member, train, config.laplace, config.train.batch_size, rank, world)

    @classmethod
    def empty_curvature(cls, scorer, config) -> LoraCurvature:
        lcfg = config.laplace
        return LoraCurvature(laplace_sites(scorer.model, lcfg), lcfg.structure, lcfg.hessian, lcfg.low_rank_threshold,
                             lcfg.low_rank)

    def fit_summary(self) -> str:
        return f"prior precision {[f.prior.tolist() for f in self.fits]}"

    @classmethod
    def from_curvatures(cls, scorer, members, member_info, curvatures: dict[int, LoraCurvature], cfg: Config,
                        validation=None, fit_meta: dict[str, Any] | None = None) -> "LaplacePosterior":
        """Finish a fit from accumulated curvatures (in-process or summed over Ray workers): eigendecompose and
        choose the prior precision (`laplace.prior_method`)."""
        fits = [member_laplace(i, curvatures[i], members[i], cfg.laplace) for i in sorted(curvatures)]
        post = cls(scorer, members, member_info, fits, cfg.laplace, fit_meta)
        if cfg.laplace.prior_method == "val_nll":
            if validation is None:
                raise ValueError("laplace.prior_method=val_nll needs a validation split")
            post.select_prior_by_val_nll(validation, cfg.train.batch_size)
        return post

    @classmethod
    def from_artifact(cls, scorer, members, member_info, tensors, extra) -> "LaplacePosterior":
        settings = config_from_dict({"laplace": extra["settings"]}).laplace
        blocks, stored = extra["blocks"], tensors[LAPLACE_FILE]
        fits = []
        for i, info in enumerate(extra["fits"]):
            eigens = {b: BlockEigen.from_tensors(stored, f"m{i}.{b}", tuple(shape)) for b, shape in blocks.items()}
            fits.append(MemberLaplace(info["member"], eigens, prior_groups(list(blocks), settings.per_module),
                                      stored[f"m{i}.prior"].clone(), info["n_data"], info["log_lik"],
                                      squared_norms(members[info["member"]], list(blocks)), info["prior_method"]))
        return cls(scorer, members, member_info, fits, settings, extra.get("fit", {}))

    def artifact_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        out: dict[str, torch.Tensor] = {}
        for i, fit in enumerate(self.fits):
            for key, eigen in fit.eigens.items():
                out.update(eigen.tensors(f"m{i}.{key}"))
            out[f"m{i}.prior"] = fit.prior.float()
        return {LAPLACE_FILE: out}

    def artifact_extra(self) -> dict[str, Any]:
        blocks = {k: list(e.shape) for k, e in self.fits[0].eigens.items()}
        return {"settings": dataclasses.asdict(self.settings), "kfac_tokens": "reduce", "blocks": blocks,
                "fits": [fit.info() for fit in self.fits], "fit": self.fit_meta}

    # --- prior precision ----------------------------------------------------------------------------
    def with_prior_precision(self, prior: float | Sequence[float] | torch.Tensor) -> "LaplacePosterior":
        """The same posterior with prior precision `prior` (a scalar, or one value per prior group) for every
        fitted member. Shares the eigenbases and the Jacobian cache (enabled here if it was not), so
        predicting a batch seen before by either posterior runs no forward or backward pass."""
        if self._cache is None:
            self.enable_jacobian_cache()
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.fits = [dataclasses.replace(f, prior=_prior_tensor(prior, f.prior.numel()), prior_source="given")
                      for f in self.fits]
        return other

    def select_prior_by_val_nll(self, dataset, batch_size: int, grid: Sequence[float] = PRIOR_GRID) -> None:
        """Set each fitted member's scalar δ to the grid value with the lowest validation NLL of its probit GLM
        predictive (one forward and C backward passes per validation batch; the grid reuses them)."""
        batches = list(eval_batches(dataset, self.scorer.tokenizer, batch_size, self.scorer.max_length,
                                    by_length=True))
        labels = torch.cat([b["labels"] for b in batches])
        for index, fit in enumerate(self.fits):
            moments = [self.glm_batch(index, b) for b in batches]
            nll = [self._probit_nll(fit, moments, labels, delta) for delta in grid]
            best = int(torch.tensor(nll).argmin())
            fit.prior = torch.full((fit.prior.numel(),), float(grid[best]))
            fit.prior_source = "val_nll"

    @staticmethod
    def _probit_nll(fit: MemberLaplace, moments: list[glm.GLMBatch], labels: torch.Tensor, delta: float) -> float:
        prior = {k: delta for k in fit.eigens}
        probs = torch.cat([glm.probit_probs(m.f_mu, glm.functional_covariance(m, fit.eigens, prior))
                           for m in moments])
        return float(-probs.gather(1, labels.to(probs.device)[:, None]).clamp_min(1e-12).log().mean())

    def enable_jacobian_cache(self) -> None:
        """Keep every predicted batch's f_mu and rotated Jacobians in memory (C·P floats per example)."""
        if self._cache is None:
            self._cache = {}

    # --- prediction ---------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return len(self.fits) * self.settings.link_samples

    def glm_batch(self, index: int, batch: dict[str, torch.Tensor]) -> glm.GLMBatch:
        """f_mu (B, C) and rotated Jacobians of fitted member `index` on a batch (from the Jacobian cache when it
        holds them): with `fits[index].eigens` they give J Σ Jᵀ for any δ (:func:`glm.functional_covariance`)."""
        key = (index, _batch_key(batch))
        if self._cache is not None and key in self._cache:
            return self._cache[key]
        fit = self.fits[index]
        with self.scorer.restoring_adapter():
            set_lora_state(self.scorer.model, self.members[fit.member])
            with grads_only_for(self.scorer.model, self.modules), torch.enable_grad():
                out = glm.batch_jacobians(self.scorer.logits, batch, self.modules, fit.eigens)
        if self._cache is not None:
            self._cache[key] = out
        return out

    def glm_moments(self, batch: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per fitted member: f_mu (B, C) and J Σ Jᵀ (B, C, C) of the GLM predictive."""
        out = []
        for index, fit in enumerate(self.fits):
            jac = self.glm_batch(index, batch)
            out.append((jac.f_mu, glm.functional_covariance(jac, fit.eigens, fit.block_prior())))
        return out

    def _generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.settings.sample_seed * 1009 + index)

    def sample_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(S, B, C) logit draws: GLM draws f ~ N(f_mu, J Σ Jᵀ), or network outputs of weight samples (nn)."""
        if self.settings.link == "nn":
            return torch.cat([self._weight_space_logits(i, batch) for i in range(len(self.fits))])
        n = self.settings.link_samples
        return torch.cat([glm.sample_logits(mu, var, n, self._generator(i))
                          for i, (mu, var) in enumerate(self.glm_moments(batch))])

    def predict_batch(self, batch: dict[str, torch.Tensor]) -> Predictive:
        if self.settings.link != "probit":
            return predictive.from_logits(self.sample_logits(batch))
        return self.probit_predictive(self.glm_moments(batch))

    def probit_predictive(self, moments: list[tuple[torch.Tensor, torch.Tensor]]) -> Predictive:
        """The probit predictive of the first len(`moments`) fitted members from their GLM moments
        (e.g. `moments[:1]` is the `laplace` row of a `laplace_ensemble`, at no extra pass)."""
        n = self.settings.link_samples
        draws = torch.cat([torch.softmax(glm.sample_logits(mu, var, n, self._generator(i)), -1)
                           for i, (mu, var) in enumerate(moments)])
        probs = torch.stack([glm.probit_probs(mu, var) for mu, var in moments]).mean(0)
        return _predictive(probs, draws)

    def weight_samples(self, index: int, count: int, generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
        """`count` adapter states θ ~ N(θ_MAP, Σ) of fitted member `index`, drawn in weight space from its
        Kronecker-factored posterior (Laplace-LoRA, arXiv 2308.13111, sec. 3)."""
        fit = self.fits[index]
        base, prior, states = self.members[fit.member], fit.block_prior(), []
        for _ in range(count):
            state = dict(base)
            for key, eigen in fit.eigens.items():
                w = base[state_key(key)]
                noise = glm.weight_noise(eigen, torch.randn(eigen.shape, generator=generator), prior[key])
                state[state_key(key)] = w + noise.to(w.dtype)
            states.append(state)
        return states

    def _weight_space_logits(self, index: int, batch: dict[str, torch.Tensor], chunk: int = 8) -> torch.Tensor:
        gen, outs = self._generator(index), []
        for start in range(0, self.settings.link_samples, chunk):
            states = self.weight_samples(index, min(chunk, self.settings.link_samples - start), gen)
            outs.append(self.scorer.logits_for_states(batch, states))
        return torch.cat(outs)

    def generation_states(self) -> list[dict[str, torch.Tensor]]:
        """`laplace.generation_samples` weight-space draws per fitted member (seeded: the same on every call)."""
        n = self.settings.generation_samples
        return [s for i in range(len(self.fits)) for s in self.weight_samples(i, n, self._generator(i))]


class LaplaceEnsemblePosterior(LaplacePosterior):
    """Mixture of Laplaces: one Laplace per ensemble member; the predictive averages their GLM predictives."""

    method = "laplace_ensemble"
    fits_every_member = True
    provides = ("laplace",)

    def predict_views(self, batch: dict[str, torch.Tensor]) -> dict[str, Predictive]:
        """laplace_ensemble and `laplace` (fitted member 0 alone: the same fit) from one set of GLM moments."""
        if self.settings.link != "probit":
            logits = self.sample_logits(batch)
            return {self.method: predictive.from_logits(logits),
                    "laplace": predictive.from_logits(logits[:self.settings.link_samples])}
        moments = self.glm_moments(batch)
        return {self.method: self.probit_predictive(moments), "laplace": self.probit_predictive(moments[:1])}


def _prior_tensor(prior, groups: int) -> torch.Tensor:
    t = torch.as_tensor(prior, dtype=torch.float32).reshape(-1)
    if t.numel() == 1:
        t = t.expand(groups).clone()
    if t.numel() != groups or not bool((t > 0).all()):
        raise ValueError(f"prior precision must be > 0 and a scalar or {groups} values, got {prior!r}")
    return t
