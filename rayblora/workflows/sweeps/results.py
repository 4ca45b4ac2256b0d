"""Bookkeeping shared by the Ray Tune sweeps (:mod:`rayblora.workflows.sweeps`): what a sweep returns, its CSV +
markdown tables (atomic writes), Tune's per-trial states, and resumable experiments (`Tuner.restore` of the
experiment in `<out>/tune/<name>` when `<out>/sweep.json` says it is the same sweep).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ray import tune
from ray.tune import ExperimentAnalysis

from rayblora.config import ConfigError
from rayblora.manifest import write_json_atomic, write_text_atomic

SWEEP_JSON = "sweep.json"


@dataclass
class SweepOutcome:
    """What a sweep wrote: its table (CSV + markdown), its rows (a train sweep's best first, a prior sweep's by
    prior precision), the chosen row, the chosen result (the best config's YAML, or the new artifact) and the
    seconds of its phases where measured."""

    out_dir: Path
    table_csv: Path
    table_md: Path
    rows: list[dict[str, Any]]
    best: dict[str, Any]
    chosen: Path
    seconds: dict[str, float] = field(default_factory=dict)
    ensemble: Path | None = None
    """A train sweep's hyper-parameter ensemble artifact (`--ensemble K`), if one was asked for."""


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return "" if value is None else str(value)


def write_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], stem: Path,
                csv_only: Sequence[str] = ()) -> tuple[Path, Path]:
    """Write `rows` as `<stem>.csv` (full precision) and `<stem>.md` (4 significant digits, without the
    `csv_only` columns), atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    shown = [c for c in columns if c not in csv_only]
    md = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    md += ["| " + " | ".join(_cell(row.get(c)) for c in shown) + " |" for row in rows]
    csv_path, md_path = stem.with_suffix(".csv"), stem.with_suffix(".md")
    write_text_atomic(csv_path, buffer.getvalue())
    write_text_atomic(md_path, "\n".join(md) + "\n")
    return csv_path, md_path


class SweepInterrupted(RuntimeError):
    """The Tune run stopped before every trial finished; rerunning with the same `--out` continues it."""


def trial_states(experiment_dir: Path) -> dict[str, tuple[str, str]]:
    """Trial directory name -> (trial id, Tune status: TERMINATED, ERROR, PENDING, RUNNING or PAUSED)."""
    return {Path(t.path).name: (t.trial_id, t.status) for t in ExperimentAnalysis(str(experiment_dir)).trials}


def raise_if_unfinished(states: dict[str, tuple[str, str]], out: Path, table: Path) -> None:
    unfinished = sorted(t for t, status in states.values() if status not in ("TERMINATED", "ERROR"))
    if unfinished:
        raise SweepInterrupted(f"the sweep in {out} stopped with {len(unfinished)} unfinished trial(s) "
                               f"({', '.join(unfinished)}); partial results in {table}; rerun the same command "
                               "(same --out) to continue it")


def open_tuner(out: Path, experiment: str, identity: dict[str, Any], trainable, fresh: Callable[[], Any],
               log: Callable[[str], None]):
    """Tuner.restore the experiment `<out>/tune/<experiment>` if a run of the same sweep is there, else `fresh()`.

    `identity` (config, space, scheduler, ...) is kept in `<out>/sweep.json`; another sweep in the same `out`
    is refused rather than silently continued."""
    exp_dir = out / "tune" / experiment
    if resumes_sweep(out, experiment, identity):
        log(f"[sweep] resuming the Tune experiment {exp_dir} (Tuner.restore)")
        return tune.Tuner.restore(str(exp_dir), trainable, resume_errored=True)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / SWEEP_JSON, json.loads(json.dumps(identity)))
    return fresh()


def resumes_sweep(out: Path, experiment: str, identity: dict[str, Any]) -> bool:
    """Whether `<out>` holds a restorable run of this same sweep (`identity`); ConfigError if it holds another
    (checked before any Ray work: it reads files only)."""
    if not tune.Tuner.can_restore(out / "tune" / experiment):
        return False
    marker = out / SWEEP_JSON
    saved = json.loads(marker.read_text()) if marker.is_file() else None
    if saved != json.loads(json.dumps(identity)):
        raise ConfigError(f"--out {out}: holds a sweep with another config, space or settings; "
                          "pass a new --out (or remove the old one) to start this sweep")
    return True


def tune_run_config(out: Path, experiment: str):
    """Tune's RunConfig of a sweep: the experiment under `<out>/tune/`, no trial retries (a member's retries
    are its Train run's)."""
    return tune.RunConfig(name=experiment, storage_path=str(out / "tune"),
                          failure_config=tune.FailureConfig(max_failures=0), verbose=1)
