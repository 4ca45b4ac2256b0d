"""Where examples come from: built-in VADER domains (registry asset) and user files, split deterministically.

All sources are read through `datasets` (Arrow). A split is a `datasets.Dataset` with the columns
`prompt` (str), `label` (int64) and `num_choices` (int64).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.parquet as pq
from datasets.table import InMemoryTable

from rayblora import assets, qa_benchmarks
from rayblora.config import DataConfig
from rayblora.data.formats import (DataError, TaskSpec, classification_spec, generation_spec, multiple_choice_spec,
                                   rows_to_examples)

BUILTIN_TASKS = ("movie", "tweets", "amazon", "nyt")
QA_TASKS = tuple(qa_benchmarks.TASKS)
"""The seed papers' benchmarks (OpenBookQA, ARC, WinoGrande, BoolQ, MMLU chemistry / physics, TriviaQA, NQ-open):
`rayblora assets fetch --tasks ...`; their test rows come from the data set's evaluation rows, their training and
validation rows from its training rows (:mod:`rayblora.qa_benchmarks`)."""
FAR_OOD_TASKS = ("newsgroups", "reuters")
USER_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class TaskData:
    """The splits of one run: train / validation / test of the task, plus the test split of each shift task.

    `ids` names the rows of each split ("train", "validation", "test", and each shift split's name) as
    "<task>:<row index in its source>", so a split can be checked against the one an artifact was trained on.
    `far_ood` holds the far-OOD splits, scored for OOD detection only (far-OOD text's `label` column is a
    placeholder 0)."""

    spec: TaskSpec
    train: Any
    validation: Any
    test: Any
    shifts: dict[str, Any]
    ids: dict[str, list[str]] = field(default_factory=dict)
    far_ood: dict[str, Any] = field(default_factory=dict)

    def eval_splits(self, in_domain_name: str) -> dict[str, Any]:
        """Evaluation splits by name: the in-domain test split first, then the shifts, then the far-OOD sets."""
        return {in_domain_name: self.test, **self.shifts, **self.far_ood}


def bootstrap_rows(dataset, seed: int):
    """A resample with replacement of `dataset`, of the same size, seeded by `seed` (rows in drawn order)."""
    n = len(dataset)
    return dataset.select(np.random.default_rng(seed).integers(0, n, n).tolist())


def split_name(task: str) -> str:
    """Short name of a task for reports: the built-in name or the file stem."""
    return task if task in BUILTIN_TASKS + QA_TASKS + FAR_OOD_TASKS else Path(task).stem


def _far_ood_rows(task: str) -> list[dict[str, Any]]:
    """Rows {"text", "label": 0} of a far-OOD set: a built-in one or a user file with a `text` column."""
    if task in FAR_OOD_TASKS:
        path = assets.far_ood_path(task)
        if not path.is_file():
            raise assets.AssetError(f"far-OOD set {task!r} needs {path}; run `rayblora assets fetch` first")
        texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    else:
        rows = read_rows(task)
        if "text" not in rows[0]:
            raise DataError(f"data.far_ood_tasks: {task} needs a 'text' column (found {sorted(rows[0])})")
        texts = [r["text"] for r in rows]
    return [{"text": t, "label": 0} for t in texts]


def _far_ood_split(task: str, cfg: DataConfig, spec: TaskSpec, size: int, limit: int | None):
    """A far-OOD split: text fed through a classification task's prompt, or for a multiple-choice task the
    evaluation rows of another multiple-choice task (e.g. WinoGrande beside OpenBookQA; labels kept, unused)."""
    if spec.kind == "multiple_choice":
        rows = [] if task in FAR_OOD_TASKS else read_rows(task)
        if not rows or not {"question", "choices"} <= set(rows[0]):
            raise DataError(f"data.far_ood_tasks: {task!r} is not multiple choice (question + choices); a "
                            "multiple-choice task's far-OOD sets are other multiple-choice tasks, e.g. winogrande")
        _, (examples,), (ids,) = _task_splits(task, rows, cfg, (size,), spec, "data.far_ood_tasks",
                                              "far-OOD task", (limit,))
        return _to_dataset(examples), ids
    if spec.kind != "classification":
        raise DataError("data.far_ood_tasks: far-OOD text is fed through the classification prompt; the task "
                        f"is {spec.kind}")
    examples = rows_to_examples(_far_ood_rows(task), spec, task)
    (idx,) = _split_indices(len(examples), (size,), cfg.seed, task, (limit,))
    return _to_dataset([examples[i] for i in idx]), _row_ids(task, idx)


def _read_user_rows(path: Path) -> list[dict[str, Any]]:
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as exc:  # datasets raises several types for a bad folder
            raise DataError(f"{path}: not a `datasets.save_to_disk` folder ({exc})") from None
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(f"{path}: is a DatasetDict; save a single Dataset (one split) instead")
        return ds.to_list()
    suffix = path.suffix.lower()
    if suffix not in USER_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {list(USER_SUFFIXES)} "
                        "or a datasets folder")
    loader = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}[suffix]
    try:
        ds = datasets.load_dataset(loader, data_files=str(path), split="train")
    except Exception as exc:
        raise DataError(f"{path}: could not be read as {loader}: {exc}") from None
    return ds.to_list()


def _builtin_rows(task: str) -> list[dict[str, Any]]:
    path = assets.vader_path(task)
    if not path.is_file():
        raise assets.AssetError(f"built-in task {task!r} needs {path}; run `make setup` "
                                "or `rayblora assets fetch` first")
    return pq.read_table(path, columns=["text", "label"]).to_pylist()


def read_rows(task: str) -> list[dict[str, Any]]:
    """Raw rows of a built-in task or a user file/folder (raises DataError naming the file)."""
    if task in BUILTIN_TASKS:
        return _builtin_rows(task)
    if task in QA_TASKS:
        return qa_benchmarks.read_task(task)
    path = Path(task)
    if not path.exists():
        raise DataError(f"data.task: {task!r} is neither a built-in task {list(BUILTIN_TASKS + QA_TASKS)} "
                        "nor an existing file or folder")
    rows = _read_user_rows(path)
    if not rows:
        raise DataError(f"{path}: contains no rows")
    return rows


def infer_spec(rows: list[dict[str, Any]], cfg: DataConfig, source: str) -> TaskSpec:
    """Classification when rows have `text`, multiple choice when they have `question` + `choices`, generation
    when they have `prompt` + `target`; prompts in the chat template if `data.chat_template`."""
    return dataclasses.replace(_row_kind_spec(rows, cfg, source), chat_template=cfg.chat_template)


def _row_kind_spec(rows: list[dict[str, Any]], cfg: DataConfig, source: str) -> TaskSpec:
    columns = set(rows[0])
    if {"prompt", "target"} <= columns:
        return generation_spec()
    if "label" not in columns:
        raise DataError(f"{source}: missing column 'label' (columns: {sorted(columns)})")
    if "text" in columns:
        return classification_spec(cfg.label_names, cfg.prompt_template)
    if {"question", "choices"} <= columns:
        widest = max(len(r["choices"]) if isinstance(r.get("choices"), (list, tuple)) else 0 for r in rows)
        return multiple_choice_spec(max(widest, 2), cfg.choice_scoring)
    raise DataError(f"{source}: needs columns 'text' + 'label' (classification), 'question' + 'choices' "
                    f"+ 'label' (multiple choice) or 'prompt' + 'target' (generation); found {sorted(columns)}")


def _to_dataset(examples: list[dict[str, Any]]):
    """Arrow-backed split. The fingerprint is computed here from the rows, which spares `datasets` its dill
    hashing of the whole table (slow, and noisy in Ray workers)."""
    digest = hashlib.sha256(json.dumps(examples, sort_keys=True).encode()).hexdigest()[:32]
    return datasets.Dataset(InMemoryTable.from_pylist(examples), fingerprint=digest)


def _row_ids(task: str, indices) -> list[str]:
    """The ids "<task name>:<row index in its source>" of a split's rows (see :attr:`TaskData.ids`)."""
    name = split_name(task)
    return [f"{name}:{i}" for i in indices]


def _split_indices(n: int, sizes: tuple[int, ...], seed: int, source: str,
                   limits: tuple[int | None, ...] = ()) -> list[np.ndarray]:
    """Disjoint index sets of the given sizes (0 in the last = all the rest) from one seeded permutation.

    `limits[i]` keeps only the first limits[i] of block i's permutation order: the same rows as a block of that
    size, while every later block stays where `sizes` puts it (fewer test rows without moving training rows)."""
    order = np.random.default_rng(seed).permutation(n)
    out, start = [], 0
    for i, size in enumerate(sizes):
        stop = n if (size == 0 and i == len(sizes) - 1) else min(start + size, n)
        if stop <= start:
            raise DataError(f"{source}: {n} rows are too few for splits of sizes {sizes}; "
                            "an empty split would result (lower data.*_size)")
        limit = limits[i] if i < len(limits) else None
        out.append(np.sort(order[start:stop if limit is None else min(stop, start + limit)]))
        start = stop
    return out


def _scorable_as(own: TaskSpec, spec: TaskSpec) -> bool:
    """Whether rows whose own spec is `own` can be scored under `spec`: the same answers, or multiple choice
    scored the same way with no more options per question."""
    return own.choices == spec.choices or (own.kind == spec.kind == "multiple_choice"
                                           and own.scoring == spec.scoring and len(own.choices) <= len(spec.choices))


def _run_spec(rows: dict[str, list[dict[str, Any]]], cfg: DataConfig) -> TaskSpec:
    """The spec of a run over `rows` (task name -> rows; the task first): the task's own, for multiple choice
    widened to the most options any multiple-choice task among them has (ARC's few five-option questions as a
    shift of four-option OpenBookQA)."""
    own = infer_spec(rows[cfg.task], cfg, cfg.task)
    if own.kind != "multiple_choice":
        return own
    specs = [infer_spec(task_rows, cfg, task) for task, task_rows in rows.items()]
    widest = max(len(s.choices) for s in specs if s.kind == "multiple_choice" and s.scoring == own.scoring)
    return dataclasses.replace(multiple_choice_spec(widest, own.scoring), chat_template=own.chat_template)


def _task_splits(task: str, rows: list[dict[str, Any]], cfg: DataConfig, sizes: tuple[int, ...],
                 spec: TaskSpec | None = None, field_name: str = "data.task", role: str = "",
                 limits: tuple[int | None, ...] = ()) -> tuple[TaskSpec, list[list[dict[str, Any]]], list[list[str]]]:
    """(spec, one example list per size in `sizes`, their row ids) of one task's `rows`, from their seeded split.

    The first splits of a permutation do not depend on the later sizes, so a shift task's (test_size,) split is
    the test split it has as the run's task. With `spec` given, the rows must be scorable under it (the same
    choices; for multiple choice, no more options)."""
    own = infer_spec(rows, cfg, task)
    if spec is not None and not _scorable_as(own, spec):
        raise DataError(f"{field_name}: {task!r} answers {list(own.choices)} but the run scores "
                        f"{list(spec.choices)}; a {role} must share the labels (multiple choice: have no more "
                        "options per question)")
    spec = spec or own
    examples = rows_to_examples(rows, spec, task)
    blocks = _official_split_indices(rows, sizes, cfg.seed, task, limits)
    return spec, [[examples[i] for i in idx] for idx in blocks], [_row_ids(task, idx) for idx in blocks]


def _official_split_indices(rows: list[dict[str, Any]], sizes: tuple[int, ...], seed: int, source: str,
                            limits: tuple[int | None, ...] = ()) -> list[np.ndarray]:
    """:func:`_split_indices` respecting a data set's own split where its rows carry one (`split` "train" /
    "eval", :mod:`rayblora.qa_benchmarks`): the first block (the test rows) from the "eval" rows, the others
    (validation, training) from the "train" rows, each by its own seeded permutation; rows without a training
    part are split as any file is."""
    where = np.array([r.get("split") for r in rows], dtype=object)
    if not (where == "train").any():
        return _split_indices(len(rows), sizes, seed, source, limits)
    pools = (np.flatnonzero(where == "eval"), np.flatnonzero(where == "train"))
    test = pools[0][_split_indices(len(pools[0]), sizes[:1], seed, f"{source} (evaluation rows)", limits[:1])[0]]
    rest = _split_indices(len(pools[1]), sizes[1:], seed, f"{source} (training rows)", limits[1:]) \
        if len(sizes) > 1 else []
    return [np.sort(test), *(np.sort(pools[1][idx]) for idx in rest)]


def load_task_data(cfg: DataConfig, test_limit: int | None = None, spec: TaskSpec | None = None) -> TaskData:
    """Load, validate, format and split the task and its shift tasks; pool the training and validation
    splits of `cfg.joint_tasks` with the task's (each task split exactly as when it is the run's task).

    `test_limit` keeps the first `test_limit` rows of the test split's permutation block (a subset of the
    `cfg.test_size` rows; the training and validation rows do not move), and of each shift / far-OOD split unless
    `cfg.shift_test_size` sets their size. `spec` (an artifact's) is the spec every split is scored under; by
    default the one the task and its joint and shift tasks imply (:func:`_run_spec`)."""
    if test_limit is not None and not 0 < test_limit <= cfg.test_size:
        raise DataError(f"test_limit must be in [1, data.test_size={cfg.test_size}], got {test_limit}")
    rows = {task: read_rows(task) for task in dict.fromkeys([cfg.task, *cfg.joint_tasks, *cfg.shift_tasks])}
    spec = spec or _run_spec(rows, cfg)
    sizes, limits = (cfg.test_size, cfg.val_size, cfg.train_size), (test_limit,)
    _, (test, val, train), (test_ids, val_ids, train_ids) = _task_splits(
        cfg.task, rows[cfg.task], cfg, sizes, spec, "data.task", "task scored under a trained artifact's answers",
        limits)
    for task in cfg.joint_tasks:
        _, (_, joint_val, joint_train), (_, j_val_ids, j_train_ids) = _task_splits(
            task, rows[task], cfg, sizes, spec, "data.joint_tasks", "joint task")
        val, train = val + joint_val, train + joint_train
        val_ids, train_ids = val_ids + j_val_ids, train_ids + j_train_ids
    ids = {"train": train_ids, "validation": val_ids, "test": test_ids}
    shift_size, limits = (cfg.shift_test_size, ()) if cfg.shift_test_size else (cfg.test_size, limits)
    shifts = {}
    for task in cfg.shift_tasks:
        _, (shift_test,), (shift_ids,) = _task_splits(task, rows[task], cfg, (shift_size,), spec,
                                                      "data.shift_tasks", "shift task", limits)
        shifts[split_name(task)] = _to_dataset(shift_test)
        ids[split_name(task)] = shift_ids
    far_ood = {}
    for task in cfg.far_ood_tasks:
        far_ood[split_name(task)], ids[split_name(task)] = _far_ood_split(task, cfg, spec, shift_size,
                                                                          limits[0] if limits else None)
    return TaskData(spec, _to_dataset(train), _to_dataset(val), _to_dataset(test), shifts, ids, far_ood)
