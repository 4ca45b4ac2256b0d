"""Hyper-parameter ensembles: members trained with different hyper-parameters (a train sweep's completed trials),
chosen by greedy forward selection on the ensemble's validation NLL, written as one `ensemble` artifact.

Wenzel et al., NeurIPS 2020 ("Hyperparameter ensembles for robustness and uncertainty quantification", sec. 3)
build deep ensembles from a random search this way; the selection is Caruana et al., ICML 2004 ("Ensemble
selection from libraries of models", sec. 2). Members of different ranks, target modules or adapted layers are
zero-padded into one LoRA config (:func:`rayblora.model.union_adapter_config`): each padded member computes the
same function as before, so every member still runs in one batched forward, and evaluation, post-hoc fits and
serving treat the artifact as any ensemble. Imports no Ray: the sweep calls it after Tune, tests call it directly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rayblora.artifact import save_posterior
from rayblora.config import Config, ConfigError
from rayblora.data.sources import load_task_data
from rayblora.data.trained_splits import split_record
from rayblora.model import lora_state, pad_lora_state, union_adapter_config
from rayblora.predictive import greedy_selection
from rayblora.registry import get_posterior_class
from rayblora.scoring import build_scorer
from rayblora.workflows.members import trunk_cache_for

SHARED_SECTIONS = ("model", "data")
"""Config sections every candidate must share: the same base model and the same validation rows."""


@dataclass
class Candidate:
    """One trained member that may join the ensemble: a name (e.g. its trial id), the config it was trained
    with, its adapter tensors (PEFT naming, its own rank) and what the manifest records of it."""

    name: str
    config: Config
    adapter: dict[str, torch.Tensor]
    info: dict[str, Any]


def check_candidates(candidates: Sequence[Candidate], size: int, replacement: bool) -> None:
    """Refuse, naming the problem, what cannot make one ensemble of `size` members."""
    if size < 1 or (not replacement and size > len(candidates)):
        raise ConfigError(f"ensemble size: cannot choose {size} of {len(candidates)} completed trial(s)"
                          + ("" if replacement else " without replacement"))
    first = candidates[0].config.to_dict()
    for c in candidates[1:]:
        mine = c.config.to_dict()
        for section in SHARED_SECTIONS:
            if mine[section] != first[section]:
                field = next(k for k in first[section] if mine[section].get(k) != first[section][k])
                raise ConfigError(f"{section}.{field}: candidate {c.name} differs from {candidates[0].name} "
                                  f"({mine[section].get(field)!r} vs {first[section][field]!r}); members of one "
                                  "ensemble share the base model and the validation rows")


def select_ensemble(candidates: Sequence[Candidate], size: int, out: str | Path,
                    log: Callable[[str], None] = print, replacement: bool = False, batch_size: int = 16) -> Path:
    """Greedily choose `size` of `candidates` by the validation NLL of their average and write them as the
    `ensemble` artifact `<out>/posterior`; its manifest's `training.hyper_ensemble` records every candidate's
    own validation NLL, the order chosen and the ensemble NLL after each step."""
    check_candidates(candidates, size, replacement)
    union = union_adapter_config([c.config.adapter for c in candidates])
    first = candidates[0].config
    cfg = dataclasses.replace(first, adapter=union, posterior=dataclasses.replace(
        first.posterior, method="ensemble", members=size, min_members=0),
        output=dataclasses.replace(first.output, dir=str(out)))
    data = load_task_data(cfg.data)
    scorer = build_scorer(cfg.model, union, data.spec, cfg.data.max_length)
    scorer.use_trunk_cache(trunk_cache_for(cfg, scorer, log))
    template = lora_state(scorer.model)
    states = [pad_lora_state(c.adapter, c.config.adapter, union, template) for c in candidates]
    ensemble = get_posterior_class("ensemble")
    log(f"[ensemble] scoring {len(states)} candidate(s) on {len(data.validation)} validation rows "
        f"(padded to rank {union.rank}, modules {list(union.target_modules)})")
    probs = ensemble(scorer, states).predict_dataset(data.validation, batch_size).sample_probs  # (M, N, C)
    labels = torch.as_tensor(data.validation["label"])
    chosen, trace = greedy_selection(probs, labels, size, replacement)
    alone = [float(-probs[m].gather(1, labels[:, None]).clamp_min(1e-30).log().mean()) for m in range(len(states))]
    log(f"[ensemble] chose {[candidates[i].name for i in chosen]}; validation NLL by step "
        f"{[round(x, 4) for x in trace]} (best single candidate {min(alone):.4f})")
    posterior = ensemble(scorer, [states[i] for i in chosen],
                         [{**candidates[i].info, "candidate": candidates[i].name} for i in chosen])
    record = {"candidates": [{"name": c.name, "val_nll": v, **c.info} for c, v in zip(candidates, alone)],
              "chosen": [candidates[i].name for i in chosen], "val_nll_by_step": trace,
              "replacement": replacement}
    training = {"config": cfg.to_dict(), "splits": split_record(data), "hyper_ensemble": record}
    return save_posterior(posterior, Path(out) / "posterior", model_config=cfg.model, adapter_config=union,
                          training=training)
