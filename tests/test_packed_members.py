"""Packed members (rayblora.train.packed): a group of K = 3 members trained in one batched loop equals three
separate runs — losses per step, final and early-stopped adapters, SWAG moments, checkpoints — to 1e-5."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from rayblora.config import ConfigError, load_config
from rayblora.data import load_task_data
from rayblora.registry import get_posterior_class
from rayblora.train.packed import train_packed
from rayblora.workflows.members import packs_members, prepare_packed, train_members_in_process, train_one_member

TOL = 1e-5
BASE = {"posterior.members": "3", "train.steps": "12", "train.eval_every": "4", "train.keep_best": "true",
        "adapter.dropout": "0.1"}


def _separate_and_packed(cfg):
    """Each member trained alone, and the three trained as one packed group, on the same data."""
    data = load_task_data(cfg.data)
    family = get_posterior_class(cfg.posterior.method)
    quiet = lambda _m: None  # noqa: E731
    alone = [train_one_member(cfg, i, data=data, family=family, log=quiet) for i in range(3)]
    scorer, members = prepare_packed(cfg, range(3), data, family, quiet)
    finals = train_packed(scorer, members, data.validation, cfg.train)
    return alone, members, finals


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=TOL, rtol=0) for k in a)


@pytest.mark.parametrize("extra", [
    {},                                                                      # members differ by seed only
    {"train.member_data": "bootstrap", "adapter.init_b_std": "0.01"},       # bootstrap rows + random B
    {"posterior.method": "multiswag", "swag.start_step": "6", "swag.collect_every": "2", "swag.max_rank": "2"},
], ids=["seed", "bootstrap-random-b", "multiswag"])
def test_a_packed_group_equals_separate_runs(sentiment_files, tmp_path, extra):
    cfg = load_config(None, tiny_overrides(sentiment_files, tmp_path / "run", **{**BASE, **extra}))
    alone, packed, finals = _separate_and_packed(cfg)
    for one, member, (adapter, metrics) in zip(alone, packed, finals):
        losses = [h["train_loss"] for h in one.history]
        assert [h["train_loss"] for h in member.ctx.history] == pytest.approx(losses, abs=TOL)
        assert [h.get("val_nll") for h in member.ctx.history] == pytest.approx(
            [h.get("val_nll") for h in one.history], abs=TOL)
        assert _close(adapter, one.scorer.adapter_state())
        assert metrics["train_loss"] == pytest.approx(one.metrics["train_loss"], abs=TOL)
        for mine, theirs in zip(member.ctx.hooks, one.hooks):  # SWAG: the moments of each trajectory
            a, b = mine.state_dict(), theirs.state_dict()
            assert any(torch.is_tensor(v) for v in b.values()) == ("posterior.method" in extra)
            assert _close({k: v for k, v in a.items() if torch.is_tensor(v)},
                          {k: v for k, v in b.items() if torch.is_tensor(v)})
    assert not _close(finals[0][0], finals[1][0])  # members still differ from each other


def test_packed_multiple_choice_rows_of_ragged_lengths_equal_separate_runs(choice_files, tmp_path):
    cfg = load_config(None, tiny_overrides(choice_files, tmp_path / "run", **BASE,
                                           **{"data.choice_scoring": "likelihood_per_token", "data.max_length": "48",
                                              "train.batch_size": "8"}))
    alone, packed, finals = _separate_and_packed(cfg)
    for one, member, (adapter, _) in zip(alone, packed, finals):
        assert [h["train_loss"] for h in member.ctx.history] == pytest.approx(
            [h["train_loss"] for h in one.history], abs=TOL)
        assert _close(adapter, one.scorer.adapter_state())


def test_packed_generation_members_equal_separate_runs(tmp_path):
    import json
    import random

    rng, path = random.Random(0), tmp_path / "add.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a} plus {b} is", "target": f" {a + b}"}) + "\n"
                            for a, b in ((rng.randint(0, 9), rng.randint(0, 99)) for _ in range(120))))
    overrides = {"model.name": "tiny-llama", "data.task": str(path), "data.shift_tasks": "[]", "data.train_size": "0",
                 "data.val_size": "16", "data.test_size": "16", "data.max_length": "32", "train.lr": "5e-3",
                 "train.batch_size": "8", "train.warmup_steps": "1", "output.dir": str(tmp_path / "run"),
                 **BASE, "train.member_data": "bootstrap"}
    alone, packed, finals = _separate_and_packed(load_config(None, [f"{k}={v}" for k, v in overrides.items()]))
    for one, member, (adapter, _) in zip(alone, packed, finals):
        assert [h["train_loss"] for h in member.ctx.history] == pytest.approx(
            [h["train_loss"] for h in one.history], abs=TOL)
        assert _close(adapter, one.scorer.adapter_state())


def test_the_packed_runner_keeps_members_as_separate_runs_keep_them(sentiment_files, tmp_path):
    runs = {}
    for runner in ("separate", "packed"):
        cfg = load_config(None, tiny_overrides(sentiment_files, tmp_path / runner, **BASE,
                                               **{"cluster.member_runner": runner}))
        runs[runner] = train_members_in_process(cfg, log=lambda _m: None)[1]
    for one, packed in zip(runs["separate"], runs["packed"]):
        assert (one.index, one.seed) == (packed.index, packed.seed)
        assert _close(one.adapter, packed.adapter)
        assert packed.metrics["train_loss"] == pytest.approx(one.metrics["train_loss"], abs=TOL)
        assert sorted(p.name for p in Path(packed.checkpoint_dir).iterdir()) == sorted(
            p.name for p in Path(one.checkpoint_dir).iterdir())


def test_packing_is_refused_where_it_would_not_be_exact(sentiment_files, tmp_path):
    blob = load_config(None, tiny_overrides(sentiment_files, tmp_path, **{"posterior.method": "blob",
                                                                          "cluster.member_runner": "packed"}))
    with pytest.raises(ConfigError, match="objective of its own"):
        packs_members(blob, get_posterior_class("blob"))
    auto = load_config(None, tiny_overrides(sentiment_files, tmp_path, **{"posterior.method": "blob",
                                                                          "cluster.member_runner": "auto"}))
    assert not packs_members(auto, get_posterior_class("blob"))
    plain = load_config(None, tiny_overrides(sentiment_files, tmp_path, **{"cluster.member_runner": "auto"}))
    assert packs_members(plain, get_posterior_class(plain.posterior.method))


def test_a_packed_group_resumes_from_its_members_checkpoints_as_if_never_stopped(sentiment_files, tmp_path):
    from rayblora.train.loop import nan_safe

    cfg = load_config(None, tiny_overrides(sentiment_files, tmp_path / "run", **BASE,
                                           **{"posterior.method": "multiswag", "swag.start_step": "4",
                                              "swag.collect_every": "2", "train.checkpoint_every": "6"}))
    data = load_task_data(cfg.data)
    family = get_posterior_class(cfg.posterior.method)

    class Killed(Exception):
        pass

    def group(resume: bool, stop_after: int | None):
        def keep_for(i):
            def keep(step, metrics, state):
                state.save(tmp_path / f"member{i}", nan_safe(metrics))
                if step == stop_after and i == 2:  # killed right after the group's checkpoint at this step
                    raise Killed

            return keep

        folders = {i: str(tmp_path / f"member{i}") for i in range(3)} if resume else None
        scorer, members = prepare_packed(cfg, range(3), data, family, lambda _m: None, keep_for, folders)
        return members, train_packed(scorer, members, data.validation, cfg.train)

    uninterrupted, whole = group(resume=False, stop_after=None)
    with pytest.raises(Killed):
        group(resume=False, stop_after=6)
    members, resumed = group(resume=True, stop_after=None)
    assert [h["step"] for h in members[0].ctx.history] == list(range(7, 13))  # no finished step redone
    for (a, _), (b, _), one, other in zip(whole, resumed, uninterrupted, members):
        assert _close(a, b)
        moments = [{k: v for k, v in m.ctx.hooks[0].state_dict().items() if torch.is_tensor(v)} for m in (one, other)]
        assert moments[0] and _close(*moments)
