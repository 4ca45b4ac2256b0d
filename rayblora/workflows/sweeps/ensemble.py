"""Hyper-parameter ensembles: members trained with different hyper-parameters (a train sweep's completed trials),
chosen by greedy forward selection on the ensemble's validation NLL, written as one `ensemble` artifact.

Wenzel et al., NeurIPS 2020 ("Hyperparameter ensembles for robustness and uncertainty quantification", sec. 3)
build deep ensembles from a random search this way; the selection is Caruana et al., ICML 2004 ("Ensemble
selection from libraries of models", sec. 2). Members of different ranks, target modules or adapted layers are
zero-padded into one LoRA config (:mod:`rayblora.workflows.padded_members`). Imports no Ray: the sweep calls it
after Tune, tests call it directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from rayblora import metrics
from rayblora.config import ConfigError
from rayblora.predictive import greedy_selection
from rayblora.registry import get_posterior_class
from rayblora.workflows.padded_members import Candidate, pad_members, write_members


def select_ensemble(candidates: Sequence[Candidate], size: int, out: str | Path,
                    log: Callable[[str], None] = print, replacement: bool = False, batch_size: int = 16) -> Path:
    """Greedily choose `size` of `candidates` by the validation NLL of their average and write them as the
    artifact `<out>/posterior` (`ensemble`, or `map` for one); its manifest's `training.hyper_ensemble` records
    every candidate's own validation NLL, the order chosen and the ensemble NLL after each step."""
    if size < 1 or (not replacement and size > len(candidates)):
        raise ConfigError(f"ensemble size: cannot choose {size} of {len(candidates)} completed trial(s)"
                          + ("" if replacement else " without replacement"))
    padded = pad_members(candidates, out, log)
    log(f"[ensemble] scoring {len(candidates)} candidate(s) on {len(padded.data.validation)} validation rows "
        f"(padded to rank {padded.config.adapter.rank}, modules {list(padded.config.adapter.target_modules)})")
    everyone = get_posterior_class("ensemble")(padded.scorer, padded.states)
    probs = everyone.predict_dataset(padded.data.validation, batch_size).sample_probs  # (M, N, C)
    labels = torch.as_tensor(padded.data.validation["label"])
    chosen, trace = greedy_selection(probs, labels, size, replacement)
    alone = [metrics.nll(p.numpy(), labels.numpy()) for p in probs]
    log(f"[ensemble] chose {[candidates[i].name for i in chosen]}; validation NLL by step "
        f"{[round(x, 4) for x in trace]} (best single candidate {min(alone):.4f})")
    record = {"candidates": [{"name": c.name, "val_nll": v, **c.info} for c, v in zip(candidates, alone)],
              "chosen": [candidates[i].name for i in chosen], "val_nll_by_step": trace,
              "replacement": replacement}
    return write_members(padded, candidates, chosen, {"hyper_ensemble": record})
