"""Offline BIG-bench tasks, generative (exact-match answers) and multiple choice, read from the ``bigbench==1.0.0``
source package.

Where from: the PyPI sdist ``bigbench-1.0.0.tar.gz`` (358 MB), ``pip download``-ed (``--no-deps --no-binary
:all:``) into ``assets.cache_dir()/"downloads"`` like the VADER sdist. It is never installed (its dependencies pull
tensorflow) nor imported: the tarball is streamed once and only the ``.../benchmark_tasks/<task>/task.json`` and
``.../benchmark_tasks/<task>/<subtask>/task.json`` files of the chosen tasks are parsed, each kind's rows built from
the same parsed file.

What: one parquet file per task and kind, the subtasks of a task pooled (sorted by subtask name, file order within
one), each row keeping its subtask name. Kind "generative": ``assets.cache_dir()/"data"/"bigbench"/<task>.parquet``,
one row per example that has a string ``target`` (or a non-empty list of them; multiple-choice-only examples are
skipped). Columns:

* ``prompt`` (str): the example's ``input``, verbatim;
* ``target`` (str): its first target, the canonical answer for exact-match scoring;
* ``subtask`` (str): the subtask folder name ("" for examples of a task without subtasks);
* ``targets`` (list of str): every target the example accepts (``target`` first);
* ``query`` (str): BIG-bench's zero-shot rendering, ``example_input_prefix + input + example_output_prefix`` of the
  example's task.json (BIG-bench's defaults ``"\\nQ: "`` / ``"\\nA: "`` where absent), stripped. Tasks such as
  linguistic_mappings carry their template only in these prefixes (input ``"abandon"``, query ``"Today I abandon.
  Yesterday I"``, target ``"abandoned"``).

Kind "choice" (multiple choice): ``.../bigbench/choice/<task>.parquet``, one row per example with ``target_scores``
(option text -> score; or the list form ``multiple_choice_targets`` / ``multiple_choice_scores``) of at least two
string options with numeric scores and a single best one; examples with a tie for the best score, with fewer than two
or more than 26 options, with a blank option or question, or malformed are skipped and counted by reason. Columns,
read by rayblora's user-file multiple-choice format (``question`` + ``choices`` + ``label``; the others are extra):

* ``question`` (str): the task's ``task_prefix`` (if any) and a newline, then the example's ``input``, stripped:
  without BIG-bench's input / output prefixes, since rayblora's multiple-choice prompt adds its own ("Question: ...
  \nAnswer:"), and without the options (``append_choices_to_input`` is ignored), e.g. ``"Is the sky blue?"``;
* ``choices`` (list of str): the option texts, verbatim, in task.json order;
* ``label`` (int64): the index in ``choices`` of the option with the highest score;
* ``subtask`` (str): as above;
* ``answer_prefix`` (str): ``example_output_prefix`` stripped, e.g. ``"A:"``;
* ``input_prefix`` (str): ``example_input_prefix`` stripped, e.g. ``"Q:"``;
* ``task_prefix`` (str): the task.json's ``task_prefix`` (instructions BIG-bench puts before every prompt, e.g.
  multiemo's "Determine whether given opinion is positive, ..."), stripped; "" where absent. BIG-bench's own
  zero-shot prompt is ``task_prefix``, ``input_prefix`` + input, ``answer_prefix`` joined (up to whitespace).

Subtasks may overlap (linguistic_mappings' ``past_tense_json`` is ``past_tense_regular_json`` plus
``past_tense_irregular_json``): pick subtasks before splitting into train and test. The folder's
``rayblora_asset.json`` (one for both kinds) records the sdist and the sha256 of every parquet file by its path
relative to the folder (``qa_wikidata.parquet``, ``choice/social_iqa.parquet``), so a re-run verifies instead of
rebuilding; every file is written to a temporary sibling and renamed into place.

Licence: BIG-bench is Apache-2.0. Canary: every task.json carries the BIG-bench canary string, which asks that the
benchmark data never enter training corpora. The data live only in the user's cache: never commit them (nor
excerpts) to a repository.
"""
from __future__ import annotations

import json
import re
import shutil
import tarfile
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from rayblora import assets
from rayblora.assets import AssetError, Progress
from rayblora.config import MAX_OPTIONS
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
DEFAULT_CHOICE_TASKS: tuple[str, ...] = ("strategyqa", "social_iqa", "goal_step_wikihow", "bbq_lite_json")
"""Multiple-choice tasks whose options are a few words of natural language (what a small model scored by option
log-likelihood can learn; options that are letters or numbers are not), median question 57-228 characters.
strategyqa: 2 290 yes/no questions ("Is it common to see frost during some college commencements?"), 53 % "Yes".
social_iqa: 1 954 rows, 2-3 options of ~3 words about people's motives and reactions. goal_step_wikihow: 7 053 rows
in 3 subtasks (goal / step inference, step ordering), 2-5 options of ~6 words. bbq_lite_json: 16 076 rows in 18
subtasks (bias categories, ambiguous / disambiguated contexts), 3 options of ~2 words, one of them "unknown"-like."""
EXPECTED_CHOICE_ROWS = {"strategyqa": 2290, "social_iqa": 1954, "goal_step_wikihow": 7053, "bbq_lite_json": 16076}
"""Multiple-choice row counts of bigbench==1.0.0 (after skips), checked after extraction like ``EXPECTED_ROWS``."""
DEFAULT_INPUT_PREFIX, DEFAULT_OUTPUT_PREFIX = "\nQ: ", "\nA: "
"""BIG-bench's JSON-task defaults for ``example_input_prefix`` / ``example_output_prefix``."""
SCHEMA = pa.schema([("prompt", pa.string()), ("target", pa.string()), ("subtask", pa.string()),
                    ("targets", pa.list_(pa.string())), ("query", pa.string())])
CHOICE_SCHEMA = pa.schema([("question", pa.string()), ("choices", pa.list_(pa.string())), ("label", pa.int64()),
                           ("subtask", pa.string()), ("answer_prefix", pa.string()), ("input_prefix", pa.string()),
                           ("task_prefix", pa.string())])
GENERATIVE, CHOICE = "generative", "choice"
SCHEMAS = {GENERATIVE: SCHEMA, CHOICE: CHOICE_SCHEMA}
"""The parquet schema of each kind."""

_TASK_JSON = re.compile(r"(?:^|/)benchmark_tasks/([^/]+)/(?:([^/]+)/)?task\.json$")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_FETCH_HINT = "run `make assets-bigbench` or `rayblora assets fetch --bigbench`"
_EMPTY = {GENERATIVE: "no example with a string `target` (multiple-choice only?); it cannot be scored by exact match",
          CHOICE: f"no example with `target_scores` of 2..{MAX_OPTIONS} non-blank options and a single best one"}

Row = dict[str, object]
Skips = dict[str, int]
"""Skipped examples by reason, e.g. ``{"tie": 3, "few_options": 1}``."""
Key = tuple[str, str]
"""``(kind, task)``."""


def bigbench_dir() -> Path:
    """Folder of the BIG-bench parquet files and their manifest (not created here)."""
    return assets.cache_dir() / "data" / "bigbench"


def _check_name(name: str) -> str:
    """``name`` if it can be a benchmark_tasks folder name, else ``AssetError``."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise AssetError(f"bad BIG-bench task name {name!r}: expected a benchmark_tasks folder name such as "
                         f"{DEFAULT_GENERATIVE_TASKS[0]!r}")
    return name


def bigbench_path(name: str) -> Path:
    """Parquet file of BIG-bench generative task ``name``; a name that cannot be a task folder raises
    ``AssetError``."""
    return bigbench_dir() / f"{_check_name(name)}.parquet"


def choice_task_path(name: str) -> Path:
    """Parquet file of BIG-bench multiple-choice task ``name`` (``.../bigbench/choice/<name>.parquet``); a name
    that cannot be a task folder raises ``AssetError``."""
    return bigbench_dir() / CHOICE / f"{_check_name(name)}.parquet"


def task_key(kind: str, task: str) -> str:
    """How results and messages name a task of a kind: ``"<task>"`` (generative) or ``"choice/<task>"``."""
    return task if kind == GENERATIVE else f"{kind}/{task}"


def _targets(example: dict) -> list[str]:
    """The example's exact-match targets: ``target`` as a one-item list, a list's strings, else []."""
    target = example.get("target")
    if isinstance(target, str):
        return [target]
    if isinstance(target, list):
        return [t for t in target if isinstance(t, str)]
    return []


def task_rows(task_json: dict, subtask: str) -> tuple[list[Row], int]:
    """Generative rows of one task.json (see the module docstring for the columns) and how many examples were
    skipped (no string target or no string input)."""
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


def _is_score(value: object) -> bool:
    """Whether ``value`` is a usable option score: an int or float (not a bool), not NaN."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def choice_options(example: dict) -> tuple[list[str], int] | str:
    """``(options, label)`` of one example, or why it is skipped: ``"no_options"`` (neither ``target_scores`` nor
    ``multiple_choice_targets``), ``"malformed"`` (a non-string option, a non-numeric score, lists of unequal
    length), ``"empty_option"`` (an option that is blank), ``"few_options"`` (fewer than two), ``"many_options"``
    (more than ``MAX_OPTIONS``), ``"tie"`` (several options share the best score)."""
    scores = example.get("target_scores")
    if isinstance(scores, dict):
        options, values = list(scores), list(scores.values())
    elif "multiple_choice_targets" in example:
        options, values = example.get("multiple_choice_targets"), example.get("multiple_choice_scores")
    else:
        return "no_options"
    if (not isinstance(options, list) or not isinstance(values, list) or len(options) != len(values)
            or not all(isinstance(o, str) for o in options) or not all(_is_score(v) for v in values)):
        return "malformed"
    if not all(o.strip() for o in options):
        return "empty_option"
    if not 2 <= len(options) <= MAX_OPTIONS:
        return "few_options" if len(options) < 2 else "many_options"
    best = max(values)
    if values.count(best) > 1:
        return "tie"
    return options, values.index(best)


def choice_rows(task_json: dict, subtask: str) -> tuple[list[Row], Skips]:
    """Multiple-choice rows of one task.json (see the module docstring for the columns) and the skipped examples
    by reason (``choice_options``'s, and ``"no_input"`` for an example whose question would be blank)."""
    in_prefix = str(task_json.get("example_input_prefix", DEFAULT_INPUT_PREFIX))
    answer_prefix = str(task_json.get("example_output_prefix", DEFAULT_OUTPUT_PREFIX)).strip()
    task_prefix = str(task_json.get("task_prefix") or "").strip()
    rows, skips = [], {}
    for example in task_json.get("examples") or []:
        found = choice_options(example) if isinstance(example, dict) else "malformed"
        text = example.get("input") if isinstance(found, tuple) else None
        question = "\n".join(p for p in (task_prefix, text.strip()) if p) if isinstance(text, str) and text.strip() \
            else ""
        if isinstance(found, tuple) and not question:
            found = "no_input"
        if isinstance(found, str):
            skips[found] = skips.get(found, 0) + 1
            continue
        rows.append({"question": question, "choices": found[0], "label": found[1], "subtask": subtask,
                     "answer_prefix": answer_prefix, "input_prefix": in_prefix.strip(), "task_prefix": task_prefix})
    return rows, skips


def _generative_rows(task_json: dict, subtask: str) -> tuple[list[Row], Skips]:
    """``task_rows`` with its skip count as ``Skips``."""
    rows, skipped = task_rows(task_json, subtask)
    return rows, ({"no_target": skipped} if skipped else {})


ROW_BUILDERS: dict[str, Callable[[dict, str], tuple[list[Row], Skips]]] = {
    GENERATIVE: _generative_rows, CHOICE: choice_rows}
"""Per kind: task.json -> (rows, skipped examples by reason)."""


def _load_member(tar: tarfile.TarFile, member: tarfile.TarInfo, sdist: Path) -> dict:
    """The JSON object of one task.json member; unreadable or non-object content raises ``AssetError``."""
    try:
        data = json.loads(tar.extractfile(member).read().decode("utf-8"))
    except (AttributeError, UnicodeDecodeError, ValueError) as exc:
        raise AssetError(f"{sdist.name}: cannot read {member.name} as JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise AssetError(f"{sdist.name}: {member.name} is not a JSON object")
    return data


def _stream(sdist: Path, kinds_of: Mapping[str, Sequence[str]]) -> dict[Key, dict[str, tuple[list[Row], Skips]]]:
    """One pass over ``sdist``: ``{(kind, task): {subtask: (rows, skips)}}`` for every task.json of the tasks in
    ``kinds_of`` (task -> its kinds)."""
    found: dict[Key, dict] = {(kind, t): {} for t, kinds in kinds_of.items() for kind in kinds}
    try:
        with tarfile.open(sdist, "r|*") as tar:
            for member in tar:
                match = _TASK_JSON.search(member.name)
                if match and match.group(1) in kinds_of and member.isfile():
                    task, subtask = match.group(1), match.group(2) or ""
                    data = _load_member(tar, member, sdist)
                    for kind in kinds_of[task]:
                        found[(kind, task)][subtask] = ROW_BUILDERS[kind](data, subtask)
    except (OSError, EOFError, tarfile.TarError) as exc:
        raise AssetError(f"cannot read the BIG-bench sdist {sdist}: {exc}") from exc
    return found


def read_selection(sdist: Path, selection: Mapping[str, Sequence[str]]) -> dict[Key, tuple[list[Row], Skips]]:
    """Stream ``sdist`` once for ``selection`` (kind -> task names) and return, per ``(kind, task)``, its rows
    (sorted by subtask, file order within one) and its skipped examples by reason. A task without any task.json,
    or without any row of a kind asked of it, raises ``AssetError`` naming it."""
    kinds_of: dict[str, list[str]] = {}
    for kind, tasks in selection.items():
        if kind not in ROW_BUILDERS:
            raise AssetError(f"unknown BIG-bench task kind {kind!r}; known: {', '.join(ROW_BUILDERS)}")
        for task in tasks:
            kinds_of.setdefault(task, []).append(kind)
    found = _stream(sdist, kinds_of)
    missing = list(dict.fromkeys(t for (_, t), subs in found.items() if not subs))
    if missing:
        raise AssetError(f"BIG-bench task(s) not found in {sdist.name}: {', '.join(missing)} (no "
                         f"benchmark_tasks/<task>/task.json); task names are the benchmark_tasks folder names")
    out = {}
    for (kind, task), subs in found.items():
        rows = [row for sub in sorted(subs) for row in subs[sub][0]]
        skips: Skips = {}
        for _, sub_skips in subs.values():
            for reason, n in sub_skips.items():
                skips[reason] = skips.get(reason, 0) + n
        if not rows:
            detail = f" (skipped: {_skipped(skips)})" if kind == CHOICE else ""
            raise AssetError(f"BIG-bench task {task!r} has {_EMPTY[kind]}{detail}")
        out[(kind, task)] = (rows, skips)
    return out


def read_tasks(sdist: Path, tasks: Sequence[str]) -> dict[str, tuple[list[Row], int]]:
    """Stream ``sdist`` once and return, per generative task, its rows (sorted by subtask, file order within one)
    and the number of skipped examples (see ``read_selection``)."""
    found = read_selection(sdist, {GENERATIVE: tasks})
    return {task: (rows, sum(skips.values())) for (_, task), (rows, skips) in found.items()}


def write_task_parquet(rows: Iterable[Row], path: Path, schema: pa.Schema = SCHEMA) -> None:
    """Write rows as parquet with ``schema``'s columns (``SCHEMA``: generative; ``CHOICE_SCHEMA``), atomically
    (temporary sibling + rename)."""
    rows = list(rows)
    table = pa.table({name: [row[name] for row in rows] for name in schema.names}, schema=schema)
    write_atomic(path, lambda tmp: pq.write_table(table, tmp), mode=0o644)


_PATHS = {GENERATIVE: bigbench_path, CHOICE: choice_task_path}
_EXPECTED = {GENERATIVE: EXPECTED_ROWS, CHOICE: EXPECTED_CHOICE_ROWS}


def _selected_paths(tasks: Iterable[str], choice_tasks: Iterable[str]) -> dict[Key, Path]:
    """``{(kind, task): path}`` of the named tasks, in order without repeats; an empty selection or a bad name
    raises ``AssetError``."""
    paths = {(kind, t): _PATHS[kind](t) for kind, names in ((GENERATIVE, tasks), (CHOICE, choice_tasks))
             for t in dict.fromkeys(names)}
    if not paths:
        raise AssetError("no BIG-bench task named")
    return paths


def _skipped(skips: Skips) -> str:
    """``"2 few_options, 3 tie"``, or ``"none"``."""
    return ", ".join(f"{n} {reason}" for reason, n in sorted(skips.items())) or "none"


def _describe(kind: str, rows: list[Row], skips: Skips) -> str:
    """Row and skip counts of one extracted task, for the progress message."""
    if kind == GENERATIVE:
        return f"{len(rows)} rows ({sum(skips.values())} examples without a string target skipped)"
    return f"{len(rows)} rows (skipped: {_skipped(skips)})"


NOT_SERVED = ("bigbench==1.0.0 is no longer served by the package registry (only the 0.0.1 stub is, checked "
              "2026-12-06); if you have its release file bigbench-1.0.0.tar.gz (358 MB, e.g. in the downloads/ "
              "folder of an older rayblora cache), pass it with `rayblora assets fetch --bigbench-sdist PATH`. The seed "
              "papers' own tasks need no BIG-bench: `rayblora assets fetch --tasks all`")


def _sdist(given: str | Path | None, progress: Progress) -> Path:
    """The BIG-bench release file: `given` (copied into the download cache), the cached one, or a download."""
    downloads = assets.cache_dir() / "downloads"
    if given is not None:
        given = Path(given).expanduser()
        if not given.is_file() or not tarfile.is_tarfile(given):
            raise AssetError(f"--bigbench-sdist {given}: not a readable .tar.gz release file")
        downloads.mkdir(parents=True, exist_ok=True)
        target = downloads / f"bigbench-{BIGBENCH_VERSION}.tar.gz"
        if not target.is_file() or sha256_file(target) != sha256_file(given):
            write_atomic(target, lambda tmp: shutil.copyfile(given, tmp), mode=0o644)
        progress(f"using {given} as {target.name}")
        return target
    try:
        return assets.download(BIGBENCH_PACKAGE, BIGBENCH_VERSION, ".tar.gz", ("--no-binary", ":all:"), progress)
    except AssetError as exc:
        raise AssetError(f"{NOT_SERVED}.\n{exc}") from None


def fetch_bigbench(tasks: Iterable[str] = DEFAULT_GENERATIVE_TASKS, progress: Progress = print,
                   choice_tasks: Iterable[str] = (), sdist: str | Path | None = None) -> dict[str, Path]:
    """Build (once) the parquet file of each generative task in ``tasks`` and each multiple-choice task in
    ``choice_tasks`` from the ``bigbench`` sdist (`sdist`, the cached copy, or downloaded once; never installed;
    one pass for both kinds); files that match the manifest are verified, not rebuilt. Returns
    ``{task_key(kind, task): path}``."""
    paths = _selected_paths(tasks, choice_tasks)
    folder = bigbench_dir()
    recorded = assets.read_asset_manifest(folder).get("files") or {}
    rel = {key: p.relative_to(folder).as_posix() for key, p in paths.items()}
    todo = [key for key, p in paths.items() if not (p.is_file() and recorded.get(rel[key]) == sha256_file(p))]
    keyed = {task_key(*key): p for key, p in paths.items()}
    if not todo:
        progress(f"bigbench ok ({', '.join(keyed)})")
        return keyed
    sdist = _sdist(sdist, progress)
    selection: dict[str, list[str]] = {}
    for kind, task in todo:
        selection.setdefault(kind, []).append(task)
    extracted = read_selection(sdist, selection)
    for kind, task in todo:
        expected, got = _EXPECTED[kind].get(task), len(extracted[(kind, task)][0])
        if expected is not None and got != expected:
            raise AssetError(f"BIG-bench {task_key(kind, task)}: extracted {got} rows, expected {expected}")
    for kind, task in todo:
        rows, skips = extracted[(kind, task)]
        write_task_parquet(rows, paths[(kind, task)], SCHEMAS[kind])
        progress(f"bigbench {task_key(kind, task)}: {_describe(kind, rows, skips)} -> {paths[(kind, task)]}")
    files = {k: v for k, v in recorded.items() if k not in {rel[key] for key in todo}}
    files.update({rel[key]: sha256_file(paths[key]) for key in todo})
    source = {"package": BIGBENCH_PACKAGE, "version": BIGBENCH_VERSION, "file": sdist.name,
              "sha256": sha256_file(sdist)}
    assets.write_asset_manifest(folder, source, files)
    return keyed


def _fetch_hint(missing: Sequence[Key]) -> str:
    """The command that fetches the ``missing`` ``(kind, task)`` files."""
    generative = [t for kind, t in missing if kind == GENERATIVE]
    choice = [t for kind, t in missing if kind == CHOICE]
    if not choice and set(generative) <= set(DEFAULT_GENERATIVE_TASKS):
        return _FETCH_HINT
    flags = [f"--bigbench --bigbench-tasks {','.join(generative)}"] if generative else []
    flags += [f"--bigbench-choice --bigbench-choice-tasks {','.join(choice)}"] if choice else []
    return f"run `rayblora assets fetch {' '.join(flags)}`"


def ensure_bigbench(tasks: Iterable[str] = DEFAULT_GENERATIVE_TASKS,
                    choice_tasks: Iterable[str] = ()) -> dict[str, Path]:
    """Return ``{task_key(kind, task): path}`` without downloading; a missing parquet file raises ``AssetError``
    naming it and the command that fetches it."""
    paths = _selected_paths(tasks, choice_tasks)
    missing = [key for key, p in paths.items() if not p.is_file()]
    if missing:
        raise AssetError(f"BIG-bench data missing: {', '.join(str(paths[key]) for key in missing)}; "
                         f"{_fetch_hint(missing)}")
    return {task_key(*key): p for key, p in paths.items()}
