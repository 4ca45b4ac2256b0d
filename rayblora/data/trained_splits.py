"""The splits an artifact was trained on, rebuilt for evaluation and post-hoc fits.

Training records the data section it used and the row ids of every split in the manifest's `training`
record (:func:`split_record`). Evaluation, `rayblora fit` and the prior sweep rebuild the data from that
record, never from the command line's data section alone: a curvature pass must see the members' training
rows and a temperature or prior must be fitted on their validation rows, not on rows of the test split.

The command line may only *limit* the test rows (`data.test_size` ≤ the trained one: the first rows of the
same permutation block, so every test row stays unseen) and choose other shift tasks; any other difference
in the data section is refused with a :class:`~rayblora.config.ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Callable

from rayblora.config import ConfigError, DataConfig
from rayblora.data.formats import DataError, TaskSpec
from rayblora.data.sources import TaskData, load_task_data
from rayblora.manifest import Artifact

FREE_FIELDS = ("shift_tasks", "far_ood_tasks", "shift_test_size", "test_size")
"""Data fields an evaluation may change: other shift or far-OOD tasks, and fewer test rows."""


def ids_digest(ids: list[str]) -> str:
    """sha256 of a split's row ids in order (16 hex digits)."""
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def split_record(data: TaskData) -> dict[str, Any]:
    """What the manifest keeps of a run's splits: the training and validation row ids, and every split's size
    and id digest."""
    return {"train_ids": data.ids["train"], "validation_ids": data.ids["validation"],
            "sizes": {name: len(ids) for name, ids in data.ids.items()},
            "digests": {name: ids_digest(ids) for name, ids in data.ids.items()}}


def _data_config(values: dict[str, Any]) -> DataConfig:
    return DataConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def trained_data_config(training: dict[str, Any], given: DataConfig) -> tuple[DataConfig, int | None]:
    """(the trained data section with the given shift tasks, test-row limit or None) for evaluating an artifact
    whose manifest `training` record is `training`; raises ConfigError where `given` would move its rows."""
    known = {f.name for f in dataclasses.fields(DataConfig)}
    trained = _data_config({k: v for k, v in training["config"]["data"].items() if k in known})
    moved = [f.name for f in dataclasses.fields(DataConfig)
             if f.name not in FREE_FIELDS and getattr(given, f.name) != getattr(trained, f.name)]
    if moved:
        detail = "; ".join(f"data.{n}: trained with {getattr(trained, n)!r}, given {getattr(given, n)!r}"
                           for n in moved)
        free = ", ".join(f"data.{n}" for n in FREE_FIELDS if n != "test_size")
        raise ConfigError(f"{detail}. Evaluation and post-hoc fits use the artifact's own splits: pass the "
                          f"config it was trained with (only data.test_size <= {trained.test_size} and {free} "
                          "may differ)")
    if given.test_size > trained.test_size:
        raise ConfigError(f"data.test_size: {given.test_size} test rows asked, the artifact was trained with "
                          f"{trained.test_size}; more would take rows of its validation or training split")
    limit = given.test_size if given.test_size < trained.test_size else None
    return dataclasses.replace(trained, shift_tasks=given.shift_tasks, far_ood_tasks=given.far_ood_tasks,
                               shift_test_size=given.shift_test_size), limit


def load_trained_data(training: dict[str, Any], given: DataConfig, log: Callable[[str], None] = print,
                      spec: TaskSpec | None = None) -> TaskData:
    """The artifact's splits (see the module doc), scored under the artifact's task `spec` where given; checks the
    rebuilt training and validation rows against the recorded ids. An artifact without a recorded data section
    (older than this record) uses `given`."""
    if "config" not in training:
        log("[data] the artifact records no training data section; using the given config's splits")
        return load_task_data(given, spec=spec)
    cfg, limit = trained_data_config(training, given)
    data = load_task_data(cfg, test_limit=limit, spec=spec)
    recorded = training.get("splits")
    if recorded:
        for split in ("train", "validation"):
            if data.ids[split] != recorded[f"{split}_ids"]:
                raise DataError(f"data.task {cfg.task!r}: the rebuilt {split} split differs from the rows the "
                                "artifact was trained on (was the data file changed since?)")
    return data


def artifact_data(artifact: Artifact, given: DataConfig, log: Callable[[str], None] = print) -> TaskData:
    """:func:`load_trained_data` of an opened artifact (its manifest's `training` record and task spec)."""
    return load_trained_data(artifact.training, given, log, manifest_spec(artifact.manifest))


def manifest_spec(manifest: dict[str, Any]) -> TaskSpec | None:
    """The task spec an artifact's manifest records (None for a manifest without one)."""
    return TaskSpec.from_dict(manifest["task"]) if "task" in manifest else None
