"""Members trained under different LoRA configs (other ranks, alphas, target modules or adapted layers) as one
artifact: the hyper-parameter ensemble of a sweep (:mod:`rayblora.workflows.sweeps.ensemble`) and adapters
trained outside rayblora (:mod:`rayblora.workflows.importing`).

Every member is zero-padded into the smallest config holding them all (:func:`rayblora.model.union_adapter_config`,
each member's scale moved into its B), so each computes exactly the function it computed alone, all of them run
in one batched forward, and evaluation, post-hoc fits and serving take the artifact as any `map` / `ensemble`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rayblora.artifact import save_posterior
from rayblora.config import Config, ConfigError
from rayblora.data.sources import TaskData, load_task_data
from rayblora.data.trained_splits import split_record
from rayblora.model import load_base_model, lora_state, pad_lora_state, resolved_adapter_config, union_adapter_config
from rayblora.registry import get_posterior_class
from rayblora.scoring import AnswerScorer, build_scorer
from rayblora.workflows.members import trunk_cache_for

SHARED_SECTIONS = ("model", "data")
"""Config sections every member must share: the same base model and the same splits."""


@dataclass
class Candidate:
    """One trained member: a name (a trial id, an adapter folder), the config it was trained with (its own
    LoRA config), its adapter tensors (PEFT naming, its own rank) and what the manifest records of it."""

    name: str
    config: Config
    adapter: dict[str, torch.Tensor]
    info: dict[str, Any]


@dataclass
class PaddedMembers:
    """The candidates in one LoRA config: the run config (union adapter, output under the artifact's run
    directory), the task's splits, a scorer of the union config on the base model and every candidate's padded
    state, in candidate order."""

    config: Config
    data: TaskData
    scorer: AnswerScorer
    states: list[dict[str, torch.Tensor]]


def check_shared(candidates: Sequence[Candidate]) -> None:
    """Refuse, naming the field, members that do not share the base model and the splits."""
    if not candidates:
        raise ConfigError("no members to put in one artifact")
    first = candidates[0].config.to_dict()
    for c in candidates[1:]:
        mine = c.config.to_dict()
        for section in SHARED_SECTIONS:
            if mine[section] != first[section]:
                field = next(k for k in first[section] if mine[section].get(k) != first[section][k])
                raise ConfigError(f"{section}.{field}: {c.name} differs from {candidates[0].name} "
                                  f"({mine[section].get(field)!r} vs {first[section][field]!r}); members of one "
                                  "artifact share the base model and the task's splits")


def pad_members(candidates: Sequence[Candidate], out: str | Path,
                log: Callable[[str], None] = print) -> PaddedMembers:
    """Load the task and the base model once and pad every candidate into the union LoRA config."""
    check_shared(candidates)
    first = candidates[0].config
    base = load_base_model(first.model)
    adapters = [resolved_adapter_config(c.config.adapter, base[0]) for c in candidates]
    union = union_adapter_config(adapters)
    cfg = dataclasses.replace(first, adapter=union, output=dataclasses.replace(first.output, dir=str(out)))
    data = load_task_data(cfg.data)
    scorer = build_scorer(cfg.model, union, data.spec, cfg.data.max_length, base=base)
    scorer.use_trunk_cache(trunk_cache_for(cfg, scorer, log))
    template = lora_state(scorer.model)
    return PaddedMembers(cfg, data, scorer, [pad_lora_state(c.adapter, adapter, union, template)
                                             for c, adapter in zip(candidates, adapters)])


def write_members(padded: PaddedMembers, candidates: Sequence[Candidate], chosen: Sequence[int],
                  record: dict[str, Any]) -> Path:
    """Write the `chosen` candidates (indices, repeats allowed) as the artifact `<output.dir>/posterior` of
    `padded.config`'s family; `record` goes into the manifest's `training` (with the config and the splits)."""
    method = "map" if len(chosen) == 1 else "ensemble"
    cfg = dataclasses.replace(padded.config, posterior=dataclasses.replace(
        padded.config.posterior, method=method, members=len(chosen), min_members=0))
    posterior = get_posterior_class(method)(padded.scorer, [padded.states[i] for i in chosen],
                                            [{**candidates[i].info, "candidate": candidates[i].name} for i in chosen])
    training = {"config": cfg.to_dict(), "splits": split_record(padded.data), **record}
    return save_posterior(posterior, cfg.out_dir / "posterior", model_config=cfg.model,
                          adapter_config=cfg.adapter, training=training)
