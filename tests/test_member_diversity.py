"""Member diversity recipes: early-stopped members (`posterior.member_adapter=best`) as a family's members."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_overrides
from rayblora.artifact import load_posterior
from rayblora.config import ConfigError, load_config
from rayblora.train.checkpoint import BEST_ADAPTER
from rayblora.data import load_task_data
from rayblora.workflows.members import train_members_in_process
from rayblora.workflows.train import train, write_posterior

EARLY = {"train.steps": "30", "train.eval_every": "10", "train.keep_best": "true", "train.lr": "2e-2"}


def test_best_member_adapter_builds_the_family_from_the_early_stopped_adapters(sentiment_files, tmp_path):
    cfg = load_config(None, tiny_overrides(sentiment_files, tmp_path, **EARLY))
    data = load_task_data(cfg.data)
    scorer, members = train_members_in_process(cfg, log=lambda _m: None, data=data)
    for m in members:  # a kept best adapter unlike the final one, whatever this short training did
        save_file({k: v * 0.5 for k, v in m.adapter.items()}, str(Path(m.checkpoint_dir) / BEST_ADAPTER))
    built = {}
    for choice in ("final", "best"):
        chosen = dataclasses.replace(cfg, posterior=dataclasses.replace(cfg.posterior, member_adapter=choice),
                                     output=dataclasses.replace(cfg.output, dir=str(tmp_path / choice)))
        built[choice] = load_posterior(write_posterior(chosen, scorer, members, data, {"config": chosen.to_dict()}))
    for m, final, early in zip(members, built["final"].members, built["best"].members):
        assert all(torch.equal(final[k], m.adapter[k]) and torch.equal(early[k], m.adapter[k] * 0.5) for k in final)
    assert [m["adapter"] for m in built["best"].member_info] == ["best", "best"]


@pytest.mark.parametrize("extra, message", [
    ({"train.keep_best": "false"}, "needs train.keep_best=true"),
    ({"posterior.method": "multiswag"}, "does not apply to multiswag"),
])
def test_best_member_adapter_is_refused_before_training_where_it_cannot_apply(sentiment_files, tmp_path, extra,
                                                                            message):
    cfg = load_config(None, tiny_overrides(sentiment_files, tmp_path, **{**EARLY, **extra,
                                                                           "posterior.member_adapter": "best"}))
    with pytest.raises(ConfigError, match=message):
        train(cfg, log=lambda _m: None, in_process=True)
    assert not (tmp_path / "members").exists()
