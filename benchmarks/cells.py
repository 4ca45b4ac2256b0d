"""Benchmark cells: one finished (recipe, task, seed) measurement kept as two small files, so a benchmark longer than
a sitting resumes where it stopped and its tables are rebuilt from committed files alone.

    <dir>/seed<s>.npz    the per-row arrays (predictions, scores, labels, row ids), compressed
    <dir>/seed<s>.json   {"config_digest", "record" (date, machine, load, command, wall seconds), ...}

A cell is reused only where its config digest equals the run's (`rayblora.workflows.members.config_digest`: what
determines the training), computed as recorded or from its stored config by today's code; another digest means
another measurement, rerun, never mixed. With `commit`, each cell
is `git commit`-ed as it lands (only its two files: other changes in the work tree are left as they are).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from record import BenchmarkRecord
from rayblora.manifest import write_json_atomic


def compact(values) -> np.ndarray:
    """An array stored small: floats as float32 (the probabilities' own precision), integers as int16 where they
    fit (labels, option counts), anything else (booleans, strings) as it is."""
    values = np.asarray(values)
    if values.dtype.kind == "f":
        return values.astype(np.float32)
    fits = values.dtype.kind in "iu" and (not values.size or -2**15 <= values.min() and values.max() < 2**15)
    return values.astype(np.int16) if fits else values


def write_cell(path: Path, arrays: dict[str, np.ndarray], digest: str, record: BenchmarkRecord | None = None,
               **meta: Any) -> None:
    """Write `arrays` (compacted) to `path` and the cell's record beside it (`digest`, the machine record of
    `record` — started when the cell's measurement started, so its load average spans it — and `meta`); each
    file is written to a temporary sibling and renamed, the .json last (a cell without it is unfinished)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez_compressed(tmp, **{k: compact(v) for k, v in arrays.items()})
    tmp.replace(path)
    write_json_atomic(path.with_suffix(".json"), {"config_digest": digest,
                                                  "record": (record or BenchmarkRecord()).meta(), **meta})


def read_cell_meta(path: Path, digest: str, rehash: Callable[[dict], str] | None = None) -> dict[str, Any] | None:
    """The record of the finished cell at `path` if it was measured under `digest`, else None. With `rehash`
    (the cell's record -> its digest under today's code, e.g. from its stored config), a cell recorded under an
    older digest still counts where its config means the same today (a config field added since, at its default,
    changes the digest's input but not the measurement)."""
    meta_path = path.with_suffix(".json")
    if not (path.is_file() and meta_path.is_file()):
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("config_digest") == digest:
        return meta
    try:
        return meta if rehash is not None and rehash(meta) == digest else None
    except (KeyError, TypeError, ValueError):  # a config today's code no longer reads: another measurement
        return None


def read_cell(path: Path, digest: str, rehash: Callable[[dict], str] | None = None) -> dict[str, np.ndarray] | None:
    """The arrays of the finished cell at `path` if it was measured under `digest` (see :func:`read_cell_meta`;
    integers as int64), else None."""
    if read_cell_meta(path, digest, rehash) is None:
        return None
    with np.load(path) as blob:
        return {k: blob[k].astype(np.int64) if blob[k].dtype.kind in "iu" else blob[k] for k in blob.files}


def commit_cell(path: Path, what: str) -> None:
    """`git commit` the cell at `path` (its .npz and .json, nothing else), the message naming `what` and the
    command that measured it."""
    files = [str(path), str(path.with_suffix(".json"))]
    subprocess.run(["git", "add", "--", *files], check=True)
    subprocess.run(["git", "commit", "-q", "-m", f"Benchmark cell {what}: {path}, from {' '.join(sys.argv)}",
                    "--", *files], check=True)
