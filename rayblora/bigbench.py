"""Offline BIG-bench generative tasks with exact-match answers, read from the ``bigbench==1.0.0`` source package.

Where from: the PyPI sdist ``bigbench-1.0.0.tar.gz`` (358 MB), ``pip download``-ed (``--no-deps --no-binary
:all:``) into ``assets.cache_dir()/"downloads"`` like the VADER sdist. It is never installed (its dependencies pull
tensorflow) nor imported: the tarball is streamed once and only the ``.../benchmark_tasks/<task>/task.json`` and
``.../benchmark_tasks/<task>/<subtask>/task.json`` files of the chosen tasks are parsed.

What: one parquet file per task, ``assets.cache_dir()/"data"/"bigbench"/<task>.parquet``, with one row per example
that has a string ``target`` (or a non-empty list of them; multiple-choice-only examples are skipped), the
subtasks of a task pooled, each row keeping its subtask name. Columns:

* ``prompt`` (str): the example's ``input``, verbatim;
* ``target`` (str): its first target, the canonical answer for exact-match scoring;
* ``subtask`` (str): the subtask folder name ("" for examples of a task without subtasks);
* ``targets`` (list of str): every target the example accepts (``target`` first);
* ``query`` (str): BIG-bench's zero-shot rendering, ``example_input_prefix + input + example_output_prefix`` of the
  example's task.json (BIG-bench's defaults ``"\\nQ: "`` / ``"\\nA: "`` where absent), stripped. Tasks such as
  linguistic_mappings carry their template only in these prefixes (input ``"abandon"``, query ``"Today I abandon.
  Yesterday I"``, target ``"abandoned"``).

Subtasks may overlap (linguistic_mappings' ``past_tense_json`` is ``past_tense_regular_json`` plus
``past_tense_irregular_json``): pick subtasks before splitting into train and test. The folder's
``rayblora_asset.json`` records the sdist and the sha256 of every parquet file, so a re-run verifies instead of
rebuilding; every file is written to a temporary sibling and renamed into place.

Licence: BIG-bench is Apache-2.0. Canary: every task.json carries the BIG-bench canary string, which asks that the
benchmark data never enter training corpora. The data live only in the user's cache: never commit them (nor
excerpts) to a repository.
"""
from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from rayblora import assets
from rayblora.assets import AssetError, Progress
from rayblora.manifest import sha256_file, write_atomic

BIGBENCH_PACKAGE, BIGBENCH_VERSION = "bigbench", "1.0.0"
DEFAULT_GENERATIVE_TASKS: tuple[str, ...] = ("qa_wikidata", "linguistic_mappings")
"""qa_wikidata: 20 442 factual completions, one template per relation ("The country of X is"), 7 % with several
targets. linguistic_mappings: 15 527 rows in 12 fixed-template subtasks (e.g. past_tense_json, 1 775 rows: "Today I
abandon. Yesterday I" -> "abandoned"). SmolLM2-135M-Instruct greedy exact match on 100 rows, zero-shot / 3-shot /
after 300 LoRA steps (r = 8, q/v of the top 4 layers, batch 8, lr 1e-3): qa_wikidata 7 / 32 / 49 %, past_tense_json
0 / 51 / 78 %. arithmetic (2-digit addition) stays at 0 / 6 / 1 %: the top layers cannot learn to add."""
EXPECTED_ROWS = {"qa_wikidata": 20442, "linguistic_mappings": 15527}
"""Row counts of bigbench==1.0.0, checked after extraction (tasks not listed are not checked)."""
DEFAULT_INPUT_PREFIX, DEFAULT_OUTPUT_PREFIX = "\nQ: ", "\nA: "
"""BIG-bench's JSON-task defaults for ``example_input_prefix`` / ``example_output_prefix``."""
SCHEMA = pa.schema([("prompt", pa.string()), ("target", pa.string()), ("subtask", pa.string()),
                    ("targets", pa.list_(pa.string())), ("query", pa.string())])

_TASK_JSON = re.compile(r"(?:^|/)benchmark_tasks/([^/]+)/(?:([^/]+)/)?task\.json$")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_FETCH_HINT = "run `make assets-bigbench` or `rayblora assets fetch --bigbench`"

Row = dict[str, object]


def bigbench_dir() -> Path:
    """Folder of the BIG-bench parquet files and their manifest (not created here)."""
    return assets.cache_dir() / "data" / "bigbench"


def bigbench_path(name: str) -> Path:
    """Parquet file of BIG-bench task ``name``; a name that cannot be a task folder raises ``AssetError``."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise AssetError(f"bad BIG-bench task name {name!r}: expected a benchmark_tasks folder name such as "
                         f"{DEFAULT_GENERATIVE_TASKS[0]!r}")
    return bigbench_dir() / f"{name}.parquet"


def _targets(example: dict) -> list[str]:
    """The example's exact-match targets: ``target`` as a one-item list, a list's strings, else []."""
    target = example.get("target")
    if isinstance(target, str):
        return [target]
    if isinstance(target, list):
        return [t for t in target if isinstance(t, str)]
    return []


def task_rows(task_json: dict, subtask: str) -> tuple[list[Row], int]:
    """Rows of one task.json (see the module docstring for the columns) and how many examples were skipped
    (no string target or no string input)."""
    in_prefix = task_json.get("example_input_prefix", DEFAULT_INPUT_PREFIX)
    out_prefix = task_json.get("example_output_prefix", DEFAULT_OUTPUT_PREFIX)
    rows, skipped = [], 0
    for example in task_json.get("examples") or []:
        targets = _targets(example) if isinstance(example, dict) else []
        prompt = example.get("input") if targets else None
        if not isinstance(prompt, str):
            skipped += 1
            continue
        rows.append({"prompt": prompt, "target": targets[0], "subtask": subtask, "targets": targets,
                     "query": f"{in_prefix}{prompt}{out_prefix}".strip()})
    return rows, skipped


def _load_member(tar: tarfile.TarFile, member: tarfile.TarInfo, sdist: Path) -> dict:
    """The JSON object of one task.json member; unreadable or non-object content raises ``AssetError``."""
    try:
        data = json.loads(tar.extractfile(member).read().decode("utf-8"))
    except (AttributeError, UnicodeDecodeError, ValueError) as exc:
        raise AssetError(f"{sdist.name}: cannot read {member.name} as JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise AssetError(f"{sdist.name}: {member.name} is not a JSON object")
    return data


def read_tasks(sdist: Path, tasks: Sequence[str]) -> dict[str, tuple[list[Row], int]]:
    """Stream ``sdist`` once and return, per task, its rows (sorted by subtask, file order within one) and the
    number of skipped examples. A task without any task.json, or without any exact-match row, raises
    ``AssetError`` naming it."""
    found: dict[str, dict[str, tuple[list[Row], int]]] = {t: {} for t in tasks}
    try:
        with tarfile.open(sdist, "r|*") as tar:
            for member in tar:
                match = _TASK_JSON.search(member.name)
                if match and match.group(1) in found and member.isfile():
                    subtask = match.group(2) or ""
                    found[match.group(1)][subtask] = task_rows(_load_member(tar, member, sdist), subtask)
    except (OSError, EOFError, tarfile.TarError) as exc:
        raise AssetError(f"cannot read the BIG-bench sdist {sdist}: {exc}") from exc
    missing = [t for t, subs in found.items() if not subs]
    if missing:
        raise AssetError(f"BIG-bench task(s) not found in {sdist.name}: {', '.join(missing)} (no "
                         f"benchmark_tasks/<task>/task.json); task names are the benchmark_tasks folder names")
    out = {}
    for task, subs in found.items():
        rows = [row for sub in sorted(subs) for row in subs[sub][0]]
        if not rows:
            raise AssetError(f"BIG-bench task {task!r} has no example with a string `target` (multiple-choice "
                             f"only?); it cannot be scored by exact match")
        out[task] = (rows, sum(skipped for _, skipped in subs.values()))
    return out


def write_task_parquet(rows: Iterable[Row], path: Path) -> None:
    """Write rows as parquet with ``SCHEMA``'s columns, atomically (temporary sibling + rename)."""
    rows = list(rows)
    table = pa.table({name: [row[name] for row in rows] for name in SCHEMA.names}, schema=SCHEMA)
    write_atomic(path, lambda tmp: pq.write_table(table, tmp), mode=0o644)


def _unique_tasks(tasks: Iterable[str]) -> list[str]:
    """The task names in order without repeats; an empty selection or a bad name raises ``AssetError``."""
    names = list(dict.fromkeys(tasks))
    if not names:
        raise AssetError("no BIG-bench task named")
    for name in names:
        bigbench_path(name)
    return names


def fetch_bigbench(tasks: Iterable[str] = DEFAULT_GENERATIVE_TASKS, progress: Progress = print) -> dict[str, Path]:
    """Build (once) ``<task>.parquet`` for each task from the ``bigbench`` sdist (downloaded once, never
    installed); tasks whose file matches the manifest are verified, not rebuilt. Returns ``{task: path}``."""
    paths = {t: bigbench_path(t) for t in _unique_tasks(tasks)}
    folder = bigbench_dir()
    recorded = assets._read_manifest(folder).get("files") or {}
    todo = [t for t, p in paths.items() if not (p.is_file() and recorded.get(p.name) == sha256_file(p))]
    if not todo:
        progress(f"bigbench ok ({', '.join(paths)})")
        return paths
    sdist = assets._download(BIGBENCH_PACKAGE, BIGBENCH_VERSION, ".tar.gz", ("--no-binary", ":all:"), progress)
    extracted = read_tasks(sdist, todo)
    for task in todo:
        rows, skipped = extracted[task]
        expected = EXPECTED_ROWS.get(task)
        if expected is not None and len(rows) != expected:
            raise AssetError(f"BIG-bench {task}: extracted {len(rows)} rows, expected {expected}")
        write_task_parquet(rows, paths[task])
        progress(f"bigbench {task}: {len(rows)} rows ({skipped} examples without a string target skipped) "
                 f"-> {paths[task]}")
    files = {k: v for k, v in recorded.items() if k not in {paths[t].name for t in todo}}
    files.update({paths[t].name: sha256_file(paths[t]) for t in todo})
    source = {"package": BIGBENCH_PACKAGE, "version": BIGBENCH_VERSION, "file": sdist.name,
              "sha256": sha256_file(sdist)}
    assets._write_manifest(folder, source, files)
    return paths


def ensure_bigbench(tasks: Iterable[str] = DEFAULT_GENERATIVE_TASKS) -> dict[str, Path]:
    """Return ``{task: path}`` without downloading; a missing parquet file raises ``AssetError`` naming it."""
    paths = {t: bigbench_path(t) for t in _unique_tasks(tasks)}
    missing = [t for t, p in paths.items() if not p.is_file()]
    if missing:
        hint = (_FETCH_HINT if set(missing) <= set(DEFAULT_GENERATIVE_TASKS) else
                f"run `rayblora assets fetch --bigbench --bigbench-tasks {','.join(missing)}`")
        raise AssetError(f"BIG-bench data missing: {', '.join(str(paths[t]) for t in missing)}; {hint}")
    return paths
