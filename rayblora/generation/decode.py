"""Decoding under a posterior: Bayesian-model-average decoding and per-state sampling, with uncertainty.

Given S adapter states θ_1..θ_S (a posterior's samples), two decoders:

* **BMA decoding** (:func:`bma_steps`): at step t every state reads the same prefix y_<t and the next token is
  chosen from the model average p(y_t | x, y_<t) = 1/S Σ_s p_θs(y_t | x, y_<t) (greedy or sampled). Each token
  carries the uncertainty split of :mod:`rayblora.predictive` over the vocabulary: total entropy H[p],
  aleatoric 1/S Σ_s H[p_θs] and the mutual information between y_t and θ (their difference); the prefix is
  the BMA's, so these are the posterior's next-token uncertainty along its own answer (Wang et al., arXiv
  2310.00035, sec. 3 for the split; Malinin & Gales, arXiv 2002.07650, for token-level scores).
* **Per-state decoding** (:func:`per_state_tokens`): each state continues its own answer; answers are
  normalised and grouped (:mod:`rayblora.generation.answers`), giving the modal answer's share and the entropy
  over groups (a semantic-entropy-style score: Kuhn et al., arXiv 2302.09664, with exact-match grouping).

The stop token (end of sequence, or a token whose text holds a stop string) ends a row; its step is scored
with the others (stopping is a decision too) but is not part of the answer's text.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from rayblora import predictive
from rayblora.generation.decoder import StackedDecoder

MODES = ("bma", "per_state")


class GenerationSettingsError(ValueError):
    """A decoding setting or a prompt is invalid; the message starts with its name (e.g. `prompts[2]: ...`)."""


@dataclass(frozen=True)
class DecodingSettings:
    """How a posterior decodes."""

    max_new_tokens: int = 32
    """Most tokens generated per prompt (the stop token included)."""
    mode: str = "bma"
    """"bma": one answer from the states' averaged next-token distribution; "per_state": one answer per
    state, grouped (the answer is the modal group's)."""
    do_sample: bool = False
    """Sample the next token instead of taking the most probable one."""
    temperature: float = 1.0
    """Sampling temperature (> 0; only with `do_sample`). Uncertainties are always those of the T = 1 model."""
    seed: int = 0
    """Seed of the sampling generator (a prompt's sampled answer repeats)."""
    stop: tuple[str, ...] = ("\n",)
    """Strings that end an answer (besides the tokenizer's end-of-sequence token)."""
    samples_per_state: int = 1
    """Answers each state samples in "per_state" mode (> 1 needs `do_sample`): S · this many answers are
    grouped, a finer group entropy (Kuhn et al. sample 10 answers from one model)."""

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= 4096:
            raise GenerationSettingsError(f"max_new_tokens: must be an integer in [1, 4096], "
                                          f"got {self.max_new_tokens!r}")
        if self.mode not in MODES:
            raise GenerationSettingsError(f"mode: must be one of {list(MODES)}, got {self.mode!r}")
        if not self.temperature > 0:
            raise GenerationSettingsError(f"temperature: must be > 0, got {self.temperature!r}")
        if not isinstance(self.samples_per_state, int) or not 1 <= self.samples_per_state <= 64:
            raise GenerationSettingsError(f"samples_per_state: must be an integer in [1, 64], "
                                          f"got {self.samples_per_state!r}")
        if self.samples_per_state > 1 and not (self.do_sample and self.mode == "per_state"):
            raise GenerationSettingsError("samples_per_state: more than one answer per state needs mode "
                                          "'per_state' and do_sample (greedy answers of one state are equal)")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise GenerationSettingsError(f"stop: must be non-empty strings, got {list(self.stop)!r}")


@dataclass
class TokenStep:
    """One BMA decoding step of B rows: token (B,), its log-probability under the BMA (B,), total entropy,
    aleatoric and mutual information (B,) in nats, `stopped` (B,) whether the token ends the row, `active` (B,)
    whether the row was still decoding (rows that ended earlier keep being fed; ignore them)."""

    token: torch.Tensor
    log_prob: torch.Tensor
    entropy: torch.Tensor
    aleatoric: torch.Tensor
    mutual_information: torch.Tensor
    stopped: torch.Tensor
    active: torch.Tensor


_STOP_IDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
STOP_SETS_KEPT = 16
"""Stop sets whose token ids are kept per tokenizer (each costs one decode of the vocabulary)."""


def eos_token_ids(tokenizer) -> set[int]:
    """The tokenizer's end-of-sequence id(s)."""
    eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


def stop_token_ids(tokenizer, stop: Sequence[str]) -> torch.Tensor:
    """Ids of the end-of-sequence token(s) and of every vocabulary token whose text contains a stop string
    (decoded once per tokenizer and stop set)."""
    per_tokenizer = _STOP_IDS.setdefault(tokenizer, {})
    key = tuple(stop)
    if key not in per_tokenizer and len(per_tokenizer) >= STOP_SETS_KEPT:
        per_tokenizer.pop(next(iter(per_tokenizer)))  # the oldest stop set: a bounded cache for serving
    if key not in per_tokenizer:
        ids = eos_token_ids(tokenizer)
        if key:
            texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
            ids |= {i for i, text in enumerate(texts) if any(s in text for s in key)}
        per_tokenizer[key] = torch.tensor(sorted(ids), dtype=torch.long)
    return per_tokenizer[key]


def choose(probs: torch.Tensor, settings: DecodingSettings, generator: torch.Generator | None) -> torch.Tensor:
    """Next token (...,) from probabilities (..., V): the argmax, or a draw from probs^(1/T) renormalised."""
    if not settings.do_sample:
        return probs.argmax(-1)
    flat = probs.reshape(-1, probs.shape[-1]).double().cpu()
    if settings.temperature != 1.0:
        flat = flat.clamp_min(1e-300) ** (1.0 / settings.temperature)
    draws = torch.multinomial(flat / flat.sum(-1, keepdim=True), 1, generator=generator)
    return draws.reshape(probs.shape[:-1]).to(probs.device)


def _generator(settings: DecodingSettings) -> torch.Generator | None:
    return torch.Generator().manual_seed(settings.seed) if settings.do_sample else None


@torch.no_grad()
def bma_steps(decoder: StackedDecoder, batch: dict[str, torch.Tensor], settings: DecodingSettings,
              stop_ids: torch.Tensor) -> Iterator[TokenStep]:
    """BMA decoding of a left-padded batch (`input_ids`, `attention_mask` (B, T)), one :class:`TokenStep` per
    step, until every row has stopped or `settings.max_new_tokens` steps."""
    logits = decoder.prefill(batch["input_ids"], batch["attention_mask"])
    rows, generator = logits.shape[1], _generator(settings)
    active = torch.ones(rows, dtype=torch.bool)
    for step in range(settings.max_new_tokens):
        pred = predictive.from_logits(logits)
        token = choose(pred.probs, settings, generator).cpu()
        log_prob = torch.log(pred.probs.gather(-1, token[:, None].to(pred.probs.device))[:, 0].clamp_min(1e-30))
        stopped = torch.isin(token, stop_ids) & active
        yield TokenStep(token, log_prob.cpu(), pred.entropy.cpu(), pred.aleatoric.cpu(),
                        pred.mutual_information.cpu(), stopped, active.clone())
        active &= ~stopped
        if not active.any() or step == settings.max_new_tokens - 1:
            return
        logits = decoder.step(token)


@torch.no_grad()
def per_state_tokens(decoder: StackedDecoder, batch: dict[str, torch.Tensor], settings: DecodingSettings,
                     stop_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each state decodes its own answer. Returns tokens (S, B, L), their log-probabilities and the entropy of
    the next-token distribution under their own state (S, B, L), and `valid` (S, B, L): the steps before and
    including each answer's stop token."""
    logits = decoder.prefill(batch["input_ids"], batch["attention_mask"])
    generator = _generator(settings)
    active = torch.ones(logits.shape[:2], dtype=torch.bool)
    tokens, log_probs, entropies, valid = [], [], [], []
    for step in range(settings.max_new_tokens):
        probs = torch.softmax(logits, -1)
        token = choose(probs, settings, generator).cpu()
        log_probs.append(torch.log(probs.gather(-1, token[..., None].to(probs.device))[..., 0]).cpu())
        entropies.append(predictive.entropy(probs).cpu())
        tokens.append(token)
        valid.append(active.clone())
        active &= ~torch.isin(token, stop_ids)
        if not active.any() or step == settings.max_new_tokens - 1:
            break
        logits = decoder.step(token)
    return tuple(torch.stack(x, -1) for x in (tokens, log_probs, entropies, valid))


@dataclass
class Generation:
    """One prompt's answer and its uncertainty.

    text: the answer (stop token and anything after a stop string removed); tokens: the token ids behind it
    (the stop token included when one was produced); entropy / aleatoric / mutual_information / log_prob: per
    token (lists of floats, nats) under the BMA (BMA mode only); scores: sequence-level scores
    (:func:`sequence_scores`, :func:`rayblora.generation.answers.group_scores`); samples: the per-state answers
    and state_scores: each one's own "mean_token_entropy" and "sequence_nll" under its state (per-state mode
    only: each state alone is a single adapter's answer); log_density / in_distribution: the prompt's
    feature-density scores (:mod:`rayblora.density`; its distance is `scores["feature_distance"]`), None where
    the posterior has no density.
    """

    text: str
    tokens: list[int]
    entropy: list[float] = field(default_factory=list)
    aleatoric: list[float] = field(default_factory=list)
    mutual_information: list[float] = field(default_factory=list)
    log_prob: list[float] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)
    state_scores: list[dict[str, float]] = field(default_factory=list)
    log_density: float | None = None
    in_distribution: bool | None = None

    def to_dict(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "entropy": self.entropy, "aleatoric": self.aleatoric,
                "mutual_information": self.mutual_information, "log_prob": self.log_prob,
                "scores": self.scores, "samples": self.samples, "state_scores": self.state_scores,
                "log_density": self.log_density, "in_distribution": self.in_distribution}


def sequence_scores(entropy: Sequence[float], aleatoric: Sequence[float], mutual_information: Sequence[float],
                    log_prob: Sequence[float]) -> dict[str, float]:
    """Sequence-level uncertainty of one BMA answer from its per-token values (higher = less certain)."""
    n = max(len(log_prob), 1)
    return {"mean_token_mi": sum(mutual_information) / n, "max_token_mi": max(mutual_information, default=0.0),
            "mean_token_entropy": sum(entropy) / n, "max_token_entropy": max(entropy, default=0.0),
            "mean_token_aleatoric": sum(aleatoric) / n, "sequence_nll": -sum(log_prob),
            "mean_token_nll": -sum(log_prob) / n}


def answer_text(tokenizer, tokens: Sequence[int], stop: Sequence[str]) -> str:
    """The text of generated `tokens`: end-of-sequence ids dropped, cut at the first stop string."""
    eos_ids = eos_token_ids(tokenizer)
    text = tokenizer.decode([t for t in tokens if t not in eos_ids], skip_special_tokens=True)
    for s in stop:
        text = text.split(s, 1)[0]
    return text.strip()
