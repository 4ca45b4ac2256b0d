"""A write that fails half-way (the disk fills, a permission is lost: injected here as the OSError the system
raises) leaves the previous artifact, the kept members and the trunk cache as they were, leaves no temporary
files, and says what failed. An artifact replaced while a server may be loading it is swapped in one step."""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
from pathlib import Path

import pytest
import torch

import rayblora.artifact
import rayblora.manifest
import rayblora.trunk_cache
import rayblora.workflows.members
from rayblora.artifact import load_posterior, save_posterior
from rayblora.manifest import MANIFEST, ArtifactError, replace_dir
from rayblora.posteriors import get_posterior_class
from rayblora.trunk_cache import TrunkCache
from rayblora.workflows.members import keep_finished, member_dir


def _disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "/injected")


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _no_temporaries(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.startswith(".")]


def test_a_failed_artifact_write_keeps_the_previous_artifact(trained_members, tiny_session_config, tmp_path,
                                                            monkeypatch):
    scorer, states, infos = trained_members
    configs = {"model_config": tiny_session_config.model, "adapter_config": tiny_session_config.adapter}
    path = save_posterior(get_posterior_class("ensemble").build(scorer, states, infos), tmp_path / "posterior",
                          **configs)
    before = _files(path)
    monkeypatch.setattr(rayblora.artifact, "write_json_atomic", _disk_full)
    with pytest.raises(ArtifactError, match=r"writing .*posterior failed \(No space left on device.*the previous "
                                            r"one is unchanged"):
        save_posterior(get_posterior_class("map").build(scorer, states[:1], infos[:1]), path, **configs)
    assert _files(path) == before and _no_temporaries(tmp_path)
    assert load_posterior(path, scorer=scorer).method == "ensemble"  # still verifies and loads


def test_a_failed_member_copy_keeps_the_kept_member(tiny_session_config, trained_members, tmp_path, monkeypatch):
    scorer, states, _ = trained_members
    cfg = dataclasses.replace(tiny_session_config, output=dataclasses.replace(tiny_session_config.output,
                                                                              dir=str(tmp_path / "run")))
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    from safetensors.torch import save_file

    from rayblora.train.checkpoint import ADAPTER, STATE_JSON
    save_file({k: v.contiguous() for k, v in states[0].items()}, str(checkpoint / ADAPTER))
    (checkpoint / STATE_JSON).write_text(json.dumps({"step": 20, "metrics": {"val_nll": 0.5}}))
    keep_finished(cfg, 0, checkpoint)
    before = _files(member_dir(cfg, 0))
    monkeypatch.setattr(rayblora.workflows.members.shutil, "copytree", _disk_full)
    with pytest.raises(ArtifactError, match="No space left on device"):
        keep_finished(cfg, 0, checkpoint)
    assert _files(member_dir(cfg, 0)) == before and _no_temporaries(member_dir(cfg, 0).parent)


def test_a_failed_trunk_cache_write_keeps_the_file_and_says_so(tmp_path, monkeypatch):
    messages = []
    cache = TrunkCache("f" * 64, 2, torch.float32, tmp_path, messages.append)
    batch = {"input_ids": torch.tensor([[0, 5, 6], [7, 8, 9]]), "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]])}
    hidden = lambda rows: rows["input_ids"].float()[..., None].expand(-1, -1, 4)  # noqa: E731 (a pure stand-in)
    cache.hidden(batch, hidden)
    path = cache.save()
    before = _files(tmp_path)
    cache.hidden({k: v + 1 for k, v in batch.items()} | {"attention_mask": batch["attention_mask"]}, hidden)
    monkeypatch.setattr(rayblora.trunk_cache, "save_file", _disk_full)
    assert cache.save() is None and "could not write" in messages[-1] and "No space left" in messages[-1]
    assert _files(tmp_path) == before and _no_temporaries(tmp_path)
    assert TrunkCache("f" * 64, 2, torch.float32, tmp_path, messages.append).load() and path.is_file()


def test_an_artifact_is_replaced_in_one_step_never_moved_away_first(tmp_path, monkeypatch):
    if getattr(ctypes.CDLL(None), "renameat2", None) is None:
        pytest.skip("this libc has no renameat2: the old directory is moved aside, then the new one in")
    final, new = tmp_path / "posterior", tmp_path / ".posterior.tmp"
    for directory, text in ((final, "old"), (new, "new")):
        directory.mkdir()
        (directory / MANIFEST).write_text(text)

    def no_rename(*_args):
        raise AssertionError("the artifact was renamed away: a reader could find it missing")

    monkeypatch.setattr(rayblora.manifest.os, "rename", no_rename)
    replace_dir(new, final)
    assert (final / MANIFEST).read_text() == "new" and not new.exists()
