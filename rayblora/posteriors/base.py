"""The one interface every posterior family implements.

A posterior over the LoRA parameters θ is built from trained members (and, for post-hoc families, data),
yields answer logits f_θs(x) for S parameter samples, and predicts through the Bayesian model average
(:mod:`rayblora.predictive`). Families persist their own tensors through the artifact hooks and declare the
training hooks their members need (:meth:`Posterior.training_hooks`); the workflows look a family up once in
:mod:`rayblora.registry` and pass it on.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Iterator, Protocol, Sequence

import torch

from rayblora import predictive
from rayblora.data.batches import eval_batches
from rayblora.density import FeatureDensity
from rayblora.generation import run as generation
from rayblora.generation.decode import DecodingSettings, Generation
from rayblora.predictive import Predictive
from rayblora.registry import get_posterior_class
from rayblora.scoring import AnswerScorer, CapturedFeatures
from rayblora.train.loop import StepHook
from rayblora.trunk import first_adapted_layer

AdapterState = dict[str, torch.Tensor]


class Curvature(Protocol):
    """What a post-hoc family's curvature pass accumulates for one member (:meth:`Posterior.curvature_pass`):
    summable over workers and carried as tensors from the worker that reports it."""

    n_data: int
    """Training rows accumulated."""

    def sum_(self, all_reduce: Callable[[torch.Tensor], object], rank: int, world: int) -> None:
        """Sum this curvature over the `world` workers of a process group in place (`all_reduce` sums a tensor)."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything accumulated, as named tensors."""

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set what :meth:`state_tensors` returned."""


class Posterior(ABC):
    """A distribution over LoRA parameters with a predictive.

    Args:
        scorer: the shared base model + adapter slot + answer tokens.
        members: trained adapter states (PEFT saved-file naming), e.g. the K ensemble members.
        member_info: per member metadata (seed, training metrics) stored in the manifest.
    """

    method: ClassVar[str] = ""
    """Registry name (also the manifest's `method`)."""
    needs_data: ClassVar[bool] = False
    """Whether :meth:`build` needs the task's data (a TaskData: post-hoc families, a fitted temperature): a view
    of this family is built only where a flow has the artifact's splits (evaluate, fit), not from the artifact
    alone (generate, serve)."""
    needs_checkpoints: ClassVar[bool] = False
    """Whether :meth:`build` needs `member_dirs=`, the members' final training checkpoint directories (e.g.
    for statistics collected by the family's training hooks); the pipeline passes them only then."""
    collected_in_training: ClassVar[str] = ""
    """What a :attr:`needs_checkpoints` family takes from its members' training (e.g. "the SWAG moments"), named
    when an artifact cannot carry it (:meth:`view_refusal`)."""
    carried_by: ClassVar[tuple[str, ...]] = ()
    """Families whose artifacts carry what this one collects in training (its own always does): an artifact of
    one of them can be viewed as this family (e.g. `swag` from a `multiswag` artifact's moments)."""
    training_sections: ClassVar[tuple[str, ...]] = ()
    """Config sections besides model/adapter/data/train that change what the family's training produces
    (part of the digest under which finished members are reused)."""
    post_hoc: ClassVar[str] = ""
    """How `rayblora fit` builds this family onto an artifact's trained members: "curvature" (a pass over the
    training split, then :meth:`from_curvatures`: Laplace), "build" (:meth:`build` from the members and data:
    TFB), or "" (not fitted post hoc: its members' training makes it)."""
    feature_density: ClassVar[bool] = True
    """Whether the members' own LoRA forward reads the features this family's predictive reads, so that a feature
    density fitted on them (:meth:`fit_density`) describes its inputs (not so where other modules join in)."""
    provides: ClassVar[tuple[str, ...]] = ()
    """Other registered families whose predictive is part of this one's, built from the same config (e.g.
    `swag` is trajectory 0 of `multiswag`): :meth:`predict_views` returns them from the same pass."""

    def __init__(self, scorer: AnswerScorer, members: Sequence[AdapterState],
                 member_info: Sequence[dict[str, Any]] | None = None):
        if not members:
            raise ValueError(f"{self.method}: needs at least one trained member")
        self.scorer = scorer
        self.members = list(members)
        self.member_info = list(member_info) if member_info is not None else [{} for _ in members]
        self.density: FeatureDensity | None = None
        """The members' feature density (:mod:`rayblora.density`), stored beside any family in the artifact;
        where set, every predictive carries its distance, log-density and in-distribution flag."""

    @classmethod
    def training_hooks(cls, cfg) -> list[StepHook]:
        """Per-step hooks each member's training loop runs for this family (e.g. SWAG's moment collection),
        built from the run's Config; they also validate the family's config section. Default: none."""
        return []

    # --- construction -------------------------------------------------------------------------------
    @classmethod
    def build(cls, scorer: AnswerScorer, members: Sequence[AdapterState],
              member_info: Sequence[dict[str, Any]], data=None, config=None) -> "Posterior":
        """Fit the family from trained members (and `data`, a TaskData, where `needs_data`)."""
        return cls(scorer, members, member_info)

    @classmethod
    def checked_member_dirs(cls, members: Sequence[AdapterState], member_dirs: Sequence[str] | None,
                            missing: str) -> Sequence[str]:
        """`member_dirs` of a :attr:`needs_checkpoints` family, one per member; ValueError `<method>: <missing>`
        where there are none (members that come without their training checkpoints)."""
        if member_dirs is None:
            raise ValueError(f"{cls.method}: {missing}")
        if len(member_dirs) != len(members):
            raise ValueError(f"{cls.method}: {len(members)} members but {len(member_dirs)} checkpoint directories")
        return member_dirs

    @classmethod
    def from_artifact(cls, scorer: AnswerScorer, members: Sequence[AdapterState],
                      member_info: Sequence[dict[str, Any]], tensors: dict[str, dict[str, torch.Tensor]],
                      extra: dict[str, Any]) -> "Posterior":
        """Rebuild from an artifact: `tensors` are the family's files, `extra` its manifest section."""
        return cls(scorer, members, member_info)

    # --- post-hoc fitting (`rayblora fit`, :attr:`post_hoc` = "curvature") ----------------------------------
    @classmethod
    def fitted_members(cls, n_members: int) -> list[int]:
        """Indices of the members a curvature pass runs over (default: every member)."""
        return list(range(n_members))

    @classmethod
    def curvature_pass(cls, scorer: AnswerScorer, member: AdapterState, train, config,
                       rank: int = 0, world: int = 1) -> "Curvature":
        """One member's curvature over this worker's shard of the training split `train` (its batches i with
        i % world == rank); the workers' curvatures are then summed (:meth:`Curvature.sum_`)."""
        raise NotImplementedError(f"{cls.method}: not fitted by a curvature pass (post_hoc={cls.post_hoc!r})")

    @classmethod
    def empty_curvature(cls, scorer: AnswerScorer, config) -> "Curvature":
        """A curvature of this family's shape with nothing accumulated, to load summed state tensors into (what a
        distributed pass's rank 0 reports)."""
        raise NotImplementedError(f"{cls.method}: not fitted by a curvature pass (post_hoc={cls.post_hoc!r})")

    @classmethod
    def from_curvatures(cls, scorer: AnswerScorer, members: Sequence[AdapterState],
                        member_info: Sequence[dict[str, Any]], curvatures: dict[int, "Curvature"], config,
                        validation=None, fit_meta: dict[str, Any] | None = None) -> "Posterior":
        """Finish a fit from the summed curvature of each fitted member (e.g. eigendecompose, choose the prior)."""
        raise NotImplementedError(f"{cls.method}: not fitted by a curvature pass (post_hoc={cls.post_hoc!r})")

    def fit_summary(self) -> str:
        """What a post-hoc fit chose, for its log line (e.g. the prior precision); empty by default."""
        return ""

    def artifact_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Extra safetensors files of this family: file name -> tensors."""
        return {}

    def artifact_extra(self) -> dict[str, Any]:
        """JSON-able manifest section of this family."""
        return {}

    @classmethod
    def view_refusal(cls, source: str) -> str | None:
        """Why this family cannot be built as a view of an artifact of the family `source` (checked before any
        model loads); None where it can: every family but those needing what only their own training collects."""
        if not cls.needs_checkpoints or source == cls.method or source in cls.carried_by:
            return None
        what = cls.collected_in_training or "what its members' training collects"
        return (f"needs {what}, which a {source!r} artifact does not carry (train with posterior.method = "
                f"{cls.method} and evaluate that artifact)")

    def view(self, method: str, data=None, config=None) -> "Posterior":
        """This posterior seen as the registered family `method` (e.g. "map" of an ensemble), carrying its feature
        density; families that carry more than their members (SWAG moments) say how in :meth:`_view`."""
        view = self._view(method, data=data, config=config)
        if view is not self:
            view.density = self.density
        return view

    def _view(self, method: str, data=None, config=None) -> "Posterior":
        """The view of :meth:`view`: itself when `method` is its own, else built from its members."""
        if method == self.method:
            return self
        return get_posterior_class(method).build(self.scorer, self.members, self.member_info, data=data,
                                                 config=config)

    # --- prediction ---------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """S, the number of parameter samples behind one prediction."""
        return len(self.members)

    @abstractmethod
    def sample_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Answer logits (S, B, C) of the parameter samples on a batch."""

    def predict_batch(self, batch: dict[str, torch.Tensor]) -> Predictive:
        """Bayesian model average on one tokenised batch."""
        return predictive.from_logits(self.sample_logits(batch))

    def predict_scored(self, batch: dict[str, torch.Tensor]) -> Predictive:
        """:meth:`predict_batch` with the feature-density scores of :attr:`density` where there is one."""
        return self._scored(batch, lambda b: {self.method: self.predict_batch(b)})[self.method]

    def _scored(self, batch: dict[str, torch.Tensor],
                predict: Callable[[dict[str, torch.Tensor]], dict[str, Predictive]]) -> dict[str, Predictive]:
        """`predict`'s views of a batch, each with the density scores of the features its forwards read (the
        members' forward when they read none: a Jacobian-cache hit, a family with its own forward)."""
        if self.density is None:
            return predict(batch)
        with self.scorer.capturing_features() as captured:
            views = predict(batch)
        scores = self.density.scores(self._density_features(batch, self.density.features, captured))
        return {name: pred.with_density(scores.distance, scores.log_density, scores.in_distribution)
                for name, pred in views.items()}

    def _density_features(self, batch: dict[str, torch.Tensor], kind: str,
                          captured: CapturedFeatures | None = None) -> torch.Tensor:
        """The (S, B, D) features a density of `kind` scores, from what a batch's forwards read (`captured`);
        where they read none (a Jacobian-cache hit, a forward of the whole model) the frozen trunk ("trunk"), or
        the members' batched forward ("answer"), runs."""
        rows = len(batch["input_ids"])
        if kind == "trunk":
            if captured is None or not captured.trunk:
                with self.scorer.capturing_features() as captured:
                    self.scorer.shared_trunk(batch)
            return captured.trunk[0][None]
        if captured is None or not captured.answer or sum(len(f) for f in captured.answer) % rows:
            with self.scorer.capturing_features() as captured:
                self.scorer.logits_for_states(batch, self.members)
        return torch.cat(captured.answer).reshape(-1, rows, captured.answer[0].shape[-1])

    # --- feature density ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def member_features(self, dataset, kind: str, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """What a feature density of `kind` scores over a split, (K, N, D), and its labels (N,): "answer", the
        members' answer-reading hidden states from one batched pass of the K members; "trunk", the frozen layers'
        prompt summaries (K = 1; from the trunk cache where there is one). A generation task reads the prompts'
        last position from the decoder's prefill."""
        if self.scorer.spec.kind == "generation":
            labels = torch.zeros(len(dataset), dtype=torch.long)
            return self._prompt_features(list(dataset["prompt"]), kind, batch_size), labels
        feats, labels = [], []
        with self.scorer.restoring_adapter():
            for batch in eval_batches(dataset, self.scorer.tokenizer, batch_size, self.scorer.max_length):
                feats.append(self._density_features(batch, kind))
                labels.append(batch["labels"])
        return torch.cat(feats, 1), torch.cat(labels)

    def _prompt_features(self, prompts: list[str], kind: str, batch_size: int) -> torch.Tensor:
        """(K, N, D) features of generation prompts from the members' decoder prefill: the final hidden state at
        each prompt's last position ("answer"), or the frozen layers' prompt summary (K = 1, "trunk")."""
        states = generation.StateSet(self.scorer.model, self.scorer.tokenizer, self.members, False,
                                     self.scorer.max_length)
        feats = []
        with self.scorer.restoring_adapter():
            for start in range(0, len(prompts), batch_size):
                batch = states.encode(prompts[start:start + batch_size])
                decoder = states.decoder()
                decoder.prefill(batch["input_ids"], batch["attention_mask"])
                feats.append(decoder.prompt_features_of(kind))
        return torch.cat(feats, 1)

    def fit_density(self, train, validation, quantile: float = 0.99, batch_size: int = 16,
                    features: str = "auto") -> FeatureDensity:
        """Fit :attr:`density` on the training split (a class-conditional Gaussian; one class for multiple choice,
        whose labels are option positions, and for generation) and set its in-distribution threshold at the
        `quantile` of the validation rows' distances (:mod:`rayblora.density`). `features`: "trunk" (the frozen
        layers' prompt summary), "answer" (per member, the hidden state the logits read: the answer position, or
        the prompt's last position for options scored by likelihood and for generation), or "auto" (trunk where
        the adapter leaves frozen layers below it, else answer)."""
        if not self.feature_density:
            raise ValueError(f"feature density: {self.method}'s predictive reads features that its members' LoRA "
                             "forward does not compute")
        frozen = first_adapted_layer(self.scorer.model) > 0
        kind = ("trunk" if frozen else "answer") if features == "auto" else features
        if kind == "trunk" and not frozen:
            raise ValueError("feature density: trunk features need frozen layers below the adapter "
                             "(adapter.layers leaves none); use posterior.density_features=answer")
        train_features, labels = self.member_features(train, kind, batch_size)
        spec = self.scorer.spec
        classes = self.scorer.num_choices if spec.kind == "classification" else 1
        reads_answer = spec.kind == "classification" or (spec.kind == "multiple_choice" and not spec.by_likelihood)
        density = FeatureDensity.fit(train_features, labels if classes > 1 else torch.zeros_like(labels), classes,
                                     meta={"position": "answer" if reads_answer else "prompt_last"}, kind=kind)
        density.calibrate(density.scores(self.member_features(validation, kind, batch_size)[0]).distance, quantile)
        self.density = density
        return density

    def predict(self, prompts: Sequence[str], batch_size: int = 16,
                choices: Sequence[Sequence[str]] | None = None) -> Predictive:
        """Predictive for raw prompts (already formatted, see :mod:`rayblora.data.formats`); a multiple-choice task
        scored by option likelihood also takes each row's option continuations `choices` (ragged: a row's missing
        options get probability 0)."""
        parts = [self.predict_scored(self.scorer.encode(
            prompts[i:i + batch_size], None if choices is None else choices[i:i + batch_size]))
            for i in range(0, len(prompts), batch_size)]
        return predictive.concat(parts)

    # --- generation ---------------------------------------------------------------------------------
    generative: ClassVar[bool] = True
    """Whether the family's samples are adapter states a decoder can run (:meth:`generation_states`)."""
    generation_lora_dropout: ClassVar[bool] = False
    """Whether decoding keeps LoRA dropout on (MC dropout: every state's rows an independent pass per step)."""

    def generation_states(self) -> Sequence[AdapterState]:
        """The S adapter states this family decodes with (:mod:`rayblora.generation`): its parameter samples
        in weight space. Default: the members (an ensemble); families with other samples override."""
        return self.members

    def state_set(self) -> generation.StateSet:
        """The states of :meth:`generation_states` on the shared model, ready to decode."""
        return generation.StateSet(self.scorer.model, self.scorer.tokenizer, self.generation_states(),
                                   self.generation_lora_dropout, self.scorer.max_length)

    def generate(self, prompts: Sequence[str], settings: DecodingSettings | None = None,
                 batch_size: int = 8) -> list[Generation]:
        """Answers to raw prompts under the posterior, one :class:`Generation` (text, per-token entropy /
        aleatoric / mutual information, sequence scores; per-state answers in "per_state" mode) per prompt.

        >>> posterior.generate(["Q: What is 12 plus 30?\nA:"], DecodingSettings(max_new_tokens=8))[0].text
        """
        settings = settings or DecodingSettings()
        with self.scorer.restoring_adapter(), self._seeded(settings):
            return generation.generate(self.state_set(), list(prompts), settings, batch_size, density=self.density)

    def generate_stream(self, prompt: str, settings: DecodingSettings | None = None) -> Iterator[dict[str, Any]]:
        """BMA decoding of one prompt as token events, then a "done" event (:func:`rayblora.generation.run.stream`)."""
        settings = settings or DecodingSettings()
        with self.scorer.restoring_adapter(), self._seeded(settings):
            yield from generation.stream(self.state_set(), prompt, settings, density=self.density)

    def _seeded(self, settings: DecodingSettings):
        """Seeds torch's generator for LoRA-dropout masks (MC dropout), so a prompt's answer repeats."""
        if not self.generation_lora_dropout:
            return contextlib.nullcontext()
        return _forked_seed(self.scorer.device, settings.seed)

    def predict_views(self, batch: dict[str, torch.Tensor]) -> dict[str, Predictive]:
        """This family's predictive and those of :attr:`provides` on one batch, from one pass."""
        return {self.method: self.predict_batch(batch)}

    def predict_dataset(self, dataset, batch_size: int = 16,
                        progress: Callable[[int, int], None] | None = None) -> Predictive:
        """Predictive over a split (a `datasets.Dataset` with prompt / label / num_choices)."""
        return self._over_dataset(dataset, batch_size, progress, lambda b: {self.method: self.predict_batch(b)})[
            self.method]

    def predict_dataset_views(self, dataset, batch_size: int = 16,
                              progress: Callable[[int, int], None] | None = None) -> dict[str, Predictive]:
        """:meth:`predict_views` over a split: view name -> Predictive."""
        return self._over_dataset(dataset, batch_size, progress, self.predict_views)

    def _over_dataset(self, dataset, batch_size, progress, predict) -> dict[str, Predictive]:
        """`predict`'s views over a split, in row order; its batches group rows of similar length (little padding)."""
        parts: dict[str, list[Predictive]] = {}
        rows, done = [], 0
        for batch in eval_batches(dataset, self.scorer.tokenizer, batch_size, self.scorer.max_length, by_length=True):
            for name, pred in self._scored(batch, predict).items():
                parts.setdefault(name, []).append(pred.cpu())  # a split's predictive is kept in host memory
            rows.append(batch["rows"])
            done += len(batch["labels"])
            if progress is not None:
                progress(done, len(dataset))
        order = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        return {name: predictive.in_row_order(predictive.concat(p), order) for name, p in parts.items()}


@contextlib.contextmanager
def _forked_seed(device: torch.device, seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


class SampledStatesPosterior(Posterior):
    """A family whose S parameter samples are explicit adapter states, `sample_states`, drawn once when it is
    built (SWAG draws, TFB / BLoB draws): one batched forward over the shared base model evaluates them all."""

    sample_states: list[AdapterState]

    @property
    def num_samples(self) -> int:
        return len(self.sample_states)

    def generation_states(self) -> Sequence[AdapterState]:
        return self.sample_states

    def sample_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Answer logits (S, B, C) of the S sample states."""
        return self.scorer.logits_for_states(batch, self.sample_states)

