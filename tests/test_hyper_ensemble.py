"""Hyper-parameter ensembles: greedy selection (Caruana et al. 2004) and members of different ranks, modules and
layers zero-padded into one artifact that predicts exactly what each member predicts under its own config."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_overrides
from rayblora.artifact import load_posterior
from rayblora.config import ConfigError, load_config
from rayblora.data import load_task_data
from rayblora.model import ModelError, pad_lora_state, union_adapter_config
from rayblora.posteriors import get_posterior_class
from rayblora.predictive import greedy_selection
from rayblora.workflows.members import train_members_in_process
from rayblora.workflows.padded_members import Candidate
from rayblora.workflows.sweeps.ensemble import select_ensemble

HYPER = {  # three members no one config holds: other ranks, alphas, modules and layers, learning rates
    "r2_qv_all": {"adapter.rank": "2", "adapter.alpha": "4", "train.lr": "5e-3"},
    "r4_q_layer1": {"adapter.rank": "4", "adapter.alpha": "16", "adapter.target_modules": "[q_proj]",
                    "adapter.layers": "[1]", "train.lr": "3e-3"},
    "r3_vo_layer0": {"adapter.rank": "3", "adapter.alpha": "3", "adapter.target_modules": "[v_proj,o_proj]",
                     "adapter.layers": "[0]", "train.lr": "8e-3", "train.seed": "7"},
}


@pytest.fixture(scope="module")
def candidates(sentiment_files, tmp_path_factory):
    """One trained member per hyper-parameter setting, with the scorer of its own config."""
    out = []
    for name, extra in HYPER.items():
        cfg = load_config(None, tiny_overrides(sentiment_files, tmp_path_factory.mktemp(name),
                                               **{"posterior.members": "1", **extra}))
        scorer, members = train_members_in_process(cfg, log=lambda _m: None)
        out.append((Candidate(name, cfg, members[0].adapter, {"lr": cfg.train.lr}), scorer))
    return out


def test_greedy_selection_adds_the_candidate_that_lowers_the_mixture_nll_most():
    # candidate 0 is confident and right on row 0 only, 1 is hedged on both, 2 is right on row 1 only
    probs = torch.tensor([[[0.9, 0.1], [0.9, 0.1]], [[0.6, 0.4], [0.3, 0.7]], [[0.2, 0.8], [0.05, 0.95]]])
    labels = torch.tensor([0, 1])
    chosen, trace = greedy_selection(probs, labels, 2)
    nll = [float(-probs[m].gather(1, labels[:, None]).log().mean()) for m in range(3)]
    assert chosen[0] == min(range(3), key=nll.__getitem__) == 1 and trace[0] == pytest.approx(nll[1])
    pair = {m: float(-((probs[1] + probs[m]) / 2).gather(1, labels[:, None]).log().mean()) for m in (0, 2)}
    assert chosen[1] == min(pair, key=pair.get) and trace[1] == pytest.approx(min(pair.values()))
    assert greedy_selection(probs, labels, 3, replacement=True)[0].count(1) >= 1
    with pytest.raises(ValueError, match="cannot choose 4 of 3"):
        greedy_selection(probs, labels, 4)
    with pytest.raises(ValueError, match="expected"):
        greedy_selection(probs[0], labels, 1)


def test_padded_members_run_as_one_batched_forward_and_equal_each_own_config(candidates, tmp_path):
    path = select_ensemble([c for c, _ in candidates], size=3, out=tmp_path, log=lambda _m: None)
    posterior = load_posterior(path)
    union = posterior.scorer.model.peft_config["default"]
    assert (union.r, set(union.target_modules)) == (4, {"q_proj", "v_proj", "o_proj"})
    record = json.loads((path / "manifest.json").read_text())["training"]["hyper_ensemble"]
    order = [next(i for i, (c, _) in enumerate(candidates) if c.name == n) for n in record["chosen"]]
    assert sorted(order) == [0, 1, 2]
    test = load_task_data(candidates[0][0].config.data).test
    batched = posterior.predict_dataset(test, 16).sample_probs  # (3, N, C): the stacked-states path
    for k, i in enumerate(order):
        candidate, own_scorer = candidates[i]
        own = get_posterior_class("map")(own_scorer, [candidate.adapter]).predict_dataset(test, 16).sample_probs[0]
        torch.testing.assert_close(batched[k], own, rtol=0, atol=1e-5)
    alone = {c["name"]: c["val_nll"] for c in record["candidates"]}
    assert record["val_nll_by_step"][0] == pytest.approx(min(alone.values()))
    assert record["chosen"][0] == min(alone, key=alone.get)


def test_selection_refuses_what_cannot_make_one_ensemble(candidates, tmp_path):
    pool = [c for c, _ in candidates]
    with pytest.raises(ConfigError, match="cannot choose 4 of 3"):
        select_ensemble(pool, size=4, out=tmp_path)
    other = load_config(None, [*tiny_overrides({"train": pool[0].config.data.task,
                                                "shift": pool[0].config.data.shift_tasks[0]}, tmp_path),
                               "data.seed=5"])
    with pytest.raises(ConfigError, match=r"data\.seed: odd differs"):
        select_ensemble([pool[0], Candidate("odd", other, pool[0].adapter, {})], size=2, out=tmp_path)
    assert not (tmp_path / "posterior").exists()


def test_padding_refuses_modules_the_union_lacks(candidates):
    a, b = candidates[0][0], candidates[1][0]
    union = union_adapter_config([b.config.adapter])
    template = {k: v for k, v in b.adapter.items()}
    with pytest.raises(ModelError, match="modules the union config lacks"):
        pad_lora_state(a.adapter, a.config.adapter, union, template)
