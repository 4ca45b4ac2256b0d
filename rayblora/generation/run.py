"""Generate answers for prompts under S adapter states: batched BMA or per-state decoding, and a token stream.

The one entry point the posterior families (:meth:`rayblora.posteriors.base.Posterior.generate`) and serving
use; the model is put in eval mode and its adapter tensors are left as they were.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import torch

from rayblora.data.batches import encode
from rayblora.density import DensityScores, FeatureDensity
from rayblora.generation.answers import group_scores
from rayblora.generation.decode import (DecodingSettings, Generation, GenerationSettingsError, answer_text,
                                        bma_steps, per_state_tokens, sequence_scores, stop_token_ids)
from rayblora.generation.decoder import StackedDecoder

AdapterState = dict[str, torch.Tensor]


class StateSet:
    """What a posterior decodes with: its S adapter states, whether LoRA dropout stays on (MC dropout), and
    the PEFT model + tokenizer they fit."""

    def __init__(self, model, tokenizer, states: Sequence[AdapterState], lora_dropout: bool = False,
                 max_length: int = 512):
        self.model, self.tokenizer, self.states = model, tokenizer, list(states)
        self.lora_dropout, self.max_length = lora_dropout, max_length

    def decoder(self, batched: bool | None = None, repeats: int = 1) -> StackedDecoder:
        """A decoder of the states, each `repeats` times (state-major blocks: s_0..s_{S-1}, s_0.., ...)."""
        return StackedDecoder(self.model, self.states * repeats, self.lora_dropout, batched)

    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        return encode(self.tokenizer, prompts, self.max_length)


def check_prompts(prompts: Sequence[str]) -> None:
    """GenerationSettingsError naming `prompts[i]` for the first prompt that is not a non-blank string."""
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise GenerationSettingsError(f"prompts[{i}]: expected a non-blank string, got {prompt!r}")


def generate(states: StateSet, prompts: Sequence[str], settings: DecodingSettings, batch_size: int = 8,
             batched: bool | None = None, density: FeatureDensity | None = None) -> list[Generation]:
    """One :class:`Generation` per prompt, in order, decoded `batch_size` prompts at a time. In "per_state"
    mode its `samples` / `state_scores` are S · `samples_per_state` answers, state s's r-th at index r·S + s.
    With a `density`, each carries its prompt's feature-density scores (from the prefill, no extra forward)."""
    check_prompts(prompts)
    stop_ids = stop_token_ids(states.tokenizer, settings.stop)
    out: list[Generation] = []
    for start in range(0, len(prompts), batch_size):
        batch = states.encode(prompts[start:start + batch_size])
        if settings.mode == "bma":
            decoder = states.decoder(batched)
            answers = _bma_batch(states, decoder, batch, settings, stop_ids)
        else:
            decoder = states.decoder(batched, settings.samples_per_state)
            answers = _per_state_batch(states, decoder, batch, settings, stop_ids)
        out += answers if density is None else with_density(answers, prompt_scores(decoder, density))
    return out


def prompt_scores(decoder: StackedDecoder, density: FeatureDensity) -> DensityScores:
    """The feature-density scores (B,) of a prefilled decoder's prompts."""
    return density.scores(decoder.prompt_features_of(density.features))


def with_density(answers: list[Generation], scores: DensityScores) -> list[Generation]:
    """The answers with their prompts' feature-density scores (B,): the distance as the sequence score
    "feature_distance" (higher = further from the training prompts), the log-density and in-distribution flag."""
    return [dataclasses.replace(a, scores={**a.scores, "feature_distance": float(scores.distance[i])},
                                log_density=float(scores.log_density[i]),
                                in_distribution=bool(scores.in_distribution[i])) for i, a in enumerate(answers)]


def _bma_batch(states: StateSet, decoder, batch, settings, stop_ids) -> list[Generation]:
    rows = batch["input_ids"].shape[0]
    values: list[dict[str, list]] = [{k: [] for k in ("tokens", "entropy", "aleatoric", "mutual_information",
                                                      "log_prob")} for _ in range(rows)]
    for step in bma_steps(decoder, batch, settings, stop_ids):
        for b in torch.nonzero(step.active)[:, 0].tolist():
            row = values[b]
            row["tokens"].append(int(step.token[b]))
            for name in ("entropy", "aleatoric", "mutual_information", "log_prob"):
                row[name].append(float(getattr(step, name)[b]))
    return [Generation(answer_text(states.tokenizer, v["tokens"], settings.stop), v["tokens"],
                       v["entropy"], v["aleatoric"], v["mutual_information"], v["log_prob"],
                       sequence_scores(v["entropy"], v["aleatoric"], v["mutual_information"], v["log_prob"]))
            for v in values]


def _per_state_batch(states: StateSet, decoder, batch, settings, stop_ids) -> list[Generation]:
    tokens, log_probs, entropies, valid = per_state_tokens(decoder, batch, settings, stop_ids)
    out = []
    for b in range(tokens.shape[1]):
        kept = [tokens[s, b][valid[s, b]].tolist() for s in range(tokens.shape[0])]
        answers = [answer_text(states.tokenizer, t, settings.stop) for t in kept]
        modal, scores = group_scores(answers)
        own = [{"mean_token_entropy": float(entropies[s, b][valid[s, b]].mean()),
                "sequence_nll": -float(log_probs[s, b][valid[s, b]].sum())} for s in range(tokens.shape[0])]
        scores["mean_state_nll"] = sum(o["sequence_nll"] for o in own) / len(own)
        out.append(Generation(modal, kept[answers.index(modal)], scores=scores, samples=answers, state_scores=own))
    return out


def stream(states: StateSet, prompt: str, settings: DecodingSettings,
           density: FeatureDensity | None = None) -> Iterator[dict[str, Any]]:
    """BMA decoding of one prompt as events: {"event": "token", "index", "token", "text" (the new text, possibly
    empty), "entropy", "aleatoric", "mutual_information", "log_prob"} per token, then {"event": "done",
    "text", "tokens", "scores"} (with a `density`, the scores hold the prompt's "feature_distance" and the event
    its "log_density" and "in_distribution"). The "text" pieces of the token events concatenate to the final text."""
    if settings.mode != "bma":
        raise GenerationSettingsError("mode: streaming decodes by the Bayesian model average; use mode 'bma'")
    check_prompts([prompt])
    stop_ids = stop_token_ids(states.tokenizer, settings.stop)
    tokens: list[int] = []
    values: dict[str, list[float]] = {k: [] for k in ("entropy", "aleatoric", "mutual_information", "log_prob")}
    sent, pending = "", None
    decoder = states.decoder()
    for step in bma_steps(decoder, states.encode([prompt]), settings, stop_ids):
        tokens.append(int(step.token[0]))
        text = answer_text(states.tokenizer, tokens, settings.stop)
        piece = ""
        if text.startswith(sent) and not text.endswith("\ufffd"):
            piece, sent = text[len(sent):], text
        if pending is not None:
            yield pending
        pending = {"event": "token", "index": len(tokens) - 1, "token": tokens[-1], "text": piece}
        for name in values:
            values[name].append(float(getattr(step, name)[0]))
            pending[name] = values[name][-1]
    final = answer_text(states.tokenizer, tokens, settings.stop)
    if pending is not None:  # sent one step late, so it can carry a piece held back (an incomplete character)
        pending["text"] += final[len(sent):] if final.startswith(sent) else ""
        yield pending
    done = {"event": "done", "text": final, "tokens": tokens,
            "scores": sequence_scores(values["entropy"], values["aleatoric"], values["mutual_information"],
                                      values["log_prob"])}
    if density is not None:
        scored = with_density([Generation(final, tokens, scores=done["scores"])],
                              prompt_scores(decoder, density))[0]
        done.update(scores=scored.scores, log_density=scored.log_density, in_distribution=scored.in_distribution)
    yield done
