"""Splits come from the artifact: row ids are disjoint, fewer test rows move nothing else, and evaluate / fit
refuse a config that would move the training or validation rows."""

from __future__ import annotations

import dataclasses

import pytest

from rayblora.artifact import save_posterior
from rayblora.config import ConfigError, load_config
from rayblora.data.formats import DataError
from rayblora.data.sources import load_task_data
from rayblora.data.trained_splits import load_trained_data, split_record, trained_data_config
from rayblora.posteriors import get_posterior_class
from rayblora.manifest import open_artifact

from conftest import tiny_overrides


def test_split_ids_are_disjoint_and_name_their_source_rows(tiny_data):
    train, val, test = (set(tiny_data.ids[s]) for s in ("train", "validation", "test"))
    assert len(train) == len(tiny_data.train) and len(val) == len(tiny_data.validation)
    assert len(test) == len(tiny_data.test)
    assert not (train & val) and not (train & test) and not (val & test)
    assert len(train | val | test) == 400  # train_size 0 = every remaining row of the 400
    shift = [name for name in tiny_data.ids if name not in ("train", "validation", "test")]
    assert len(shift) == 1 and len(tiny_data.ids[shift[0]]) == len(tiny_data.shifts[shift[0]])


def test_test_limit_takes_a_subset_of_the_test_rows_and_moves_nothing_else(tiny_session_config, tiny_data):
    limited = load_task_data(tiny_session_config.data, test_limit=25)
    assert limited.ids["train"] == tiny_data.ids["train"]
    assert limited.ids["validation"] == tiny_data.ids["validation"]
    assert len(limited.test) == 25 and set(limited.ids["test"]) < set(tiny_data.ids["test"])
    for name, ids in limited.shifts.items():
        assert set(limited.ids[name]) < set(tiny_data.ids[name]) and len(ids) == 25
    with pytest.raises(DataError, match="test_limit"):
        load_task_data(tiny_session_config.data, test_limit=61)


def _training(cfg, data):
    return {"config": cfg.to_dict(), "splits": split_record(data)}


def test_trained_data_config_refuses_moved_rows_and_allows_fewer_test_rows(tiny_session_config, tiny_data):
    training, data_cfg = _training(tiny_session_config, tiny_data), tiny_session_config.data
    same, limit = trained_data_config(training, dataclasses.replace(data_cfg, test_size=30, shift_tasks=()))
    assert limit == 30 and same.shift_tasks == () and same.val_size == data_cfg.val_size
    assert trained_data_config(training, data_cfg)[1] is None
    for change, field in ((dict(val_size=30), "data.val_size"), (dict(seed=1), "data.seed"),
                          (dict(train_size=100), "data.train_size"),
                          (dict(prompt_template="{text} ->"), "data.prompt_template")):
        with pytest.raises(ConfigError, match=field):
            trained_data_config(training, dataclasses.replace(data_cfg, **change))
    with pytest.raises(ConfigError, match="data.test_size"):
        trained_data_config(training, dataclasses.replace(data_cfg, test_size=61))


def test_a_changed_data_file_is_detected(tiny_session_config, tiny_data):
    training = _training(tiny_session_config, tiny_data)
    training["splits"]["train_ids"] = list(reversed(training["splits"]["train_ids"]))
    with pytest.raises(DataError, match="differs from the rows"):
        load_trained_data(training, tiny_session_config.data)


@pytest.fixture(scope="module")
def recorded_artifact(trained_members, tiny_session_config, tiny_data, tmp_path_factory):
    scorer, states, infos = trained_members
    post = get_posterior_class("ensemble").build(scorer, states, infos)
    return save_posterior(post, tmp_path_factory.mktemp("recorded") / "posterior",
                          model_config=tiny_session_config.model, adapter_config=tiny_session_config.adapter,
                          training=_training(tiny_session_config, tiny_data))


def test_evaluate_and_fit_use_the_artifacts_splits(recorded_artifact, sentiment_files, tmp_path):
    from rayblora.workflows.evaluate import evaluate_methods
    from rayblora.workflows.fit import fit_posterior

    base = tiny_overrides(sentiment_files, tmp_path / "run")
    artifact = open_artifact(recorded_artifact)
    results = evaluate_methods(artifact, load_config(None, [*base, "data.test_size=20"]), ["map"], log=lambda _: None)
    assert {len(r.labels) for r in results["map"].values()} == {20}
    for bad in ("data.val_size=30", "data.train_size=100"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            evaluate_methods(artifact, load_config(None, [*base, bad]), ["map"], log=lambda _: None)
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            fit_posterior(recorded_artifact, load_config(None, [*base, bad, "laplace.fit_batches=1"]),
                          tmp_path / "fitted", method="laplace_ensemble", log=lambda _: None)
