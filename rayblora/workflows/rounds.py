"""Dynamic fine-tuning (BH-PEFT, arXiv 2508.02711, sec. 3.3): one hybrid_vi posterior per round of data, round
t+1 starting from round t's posterior mean and using round t's posterior N(μ_t, diag σ_t²) as its prior.

`run_rounds(cfg)` trains `hybrid.rounds` (e.g. movie → tweets → amazon → nyt) as a chain of artifacts

    <output.dir>/round-<t>/posterior          dynamic chain (round-to-round prior)
    <output.dir>/naive/round-<t>/posterior    naive sequential chain (`hybrid.compare_naive`): the same
                                              initialisation from round t, but the fixed N(0, prior_std²) prior
    <output.dir>/retrain/posterior            retrain on all data (`hybrid.compare_retrain`): one posterior
                                              from scratch on the pooled training splits of every round

each with its lineage in the manifest (chain, round, task, parent artifact and the sha256 of its manifest).
Each round's members are Ray Train runs through :func:`rayblora.workflows.train.train`, or, with `in_process=True`,
trained in this process (:func:`rayblora.workflows.members.train_members_in_process`; tests, small runs). The report
evaluates every round's posterior on the test split of every round so far (the forgetting matrix of accuracy / NLL /
ECE) and, for the last round, the accuracy after rejecting the 0–90 % most uncertain examples (predictive entropy).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from rayblora.artifact import load_posterior
from rayblora.config import Config, ConfigError, HybridConfig
from rayblora.data.sources import load_task_data, split_name
from rayblora.posteriors.hybrid.variational import HOOK_NAME
from rayblora.manifest import ArtifactError, parent_lineage, read_manifest, write_json_atomic, write_text_atomic
from rayblora.metrics import accuracy_at_coverage, classification_metrics
from rayblora.report import SplitResult, write_coverage_png
from rayblora.scoring import build_scorer
from rayblora.workflows.train import train

CHAINS = {"dynamic": True, "naive": False}
"""Chain name -> whether round t's posterior is round t+1's prior."""
REJECTION = tuple(round(0.1 * i, 1) for i in range(10))
"""Fractions of the most uncertain test examples rejected on the accuracy-vs-rejection curve."""


def _check_method(cfg: Config) -> None:
    if cfg.posterior.method != HOOK_NAME:
        raise ConfigError(f"posterior.method: dynamic fine-tuning rounds need {HOOK_NAME!r}, got "
                          f"{cfg.posterior.method!r}")


def _round_hybrid(cfg: Config, chain: str, parent: Path | None) -> HybridConfig:
    """`hybrid` of a round of `chain` trained after `parent`. Knobs that do not act in a round keep their
    defaults, so such rounds are reused when only those knobs change: `prior_scale` without a round-to-round
    prior (round 0, naive, retrain), `round_precision` outside the dynamic chain (nothing reads its prior)."""
    with_prior = CHAINS.get(chain, False) and parent is not None
    hybrid = dataclasses.replace(cfg.hybrid, prior_artifact=str(parent or ""), round_prior=with_prior)
    if not with_prior:
        hybrid = dataclasses.replace(hybrid, prior_scale=HybridConfig.prior_scale)
    if not CHAINS.get(chain, False):
        hybrid = dataclasses.replace(hybrid, round_precision=HybridConfig.round_precision)
    return hybrid


def round_config(cfg: Config, task: str, t: int, chain: str, parent: Path | None) -> Config:
    """The run config of round `t` of `chain`: its task, output folder, and the parent as prior / init."""
    _check_method(cfg)
    root = cfg.out_dir if chain == "dynamic" else cfg.out_dir / chain
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, task=task, shift_tasks=()),
        output=dataclasses.replace(cfg.output, dir=str(root / f"round-{t}"), name=f"{cfg.output.name}-{chain}{t}"),
        hybrid=_round_hybrid(cfg, chain, parent))


def retrain_config(cfg: Config, tasks: Sequence[str]) -> Config:
    """The run config of the retrain-on-all-data reference: the rounds' training splits pooled
    (`data.joint_tasks`), `train.steps` per round, fixed N(0, prior_std²) prior, fresh initialisation."""
    _check_method(cfg)
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, task=tasks[0], joint_tasks=tuple(tasks[1:]), shift_tasks=()),
        train=dataclasses.replace(cfg.train, steps=cfg.train.steps * len(tasks)),
        output=dataclasses.replace(cfg.output, dir=str(cfg.out_dir / "retrain"), name=f"{cfg.output.name}-retrain"),
        hybrid=_round_hybrid(cfg, "retrain", None))


def round_lineage(chain: str, t: int, task: str, parent: Path | None) -> dict[str, Any]:
    """The manifest's lineage of a round: chain, round index, task, parent artifact and its manifest's sha256."""
    lineage: dict[str, Any] = {"chain": chain, "round": t, "task": task, "round_prior": CHAINS.get(chain, False),
                               "parent": None, "parent_manifest_sha256": None}
    if parent is not None:
        lineage.update(parent_lineage(parent))
    return lineage


def finished_round(cfg: Config, lineage: dict[str, Any]) -> Path | None:
    """The artifact `<output.dir>/posterior` of a round trained before with exactly this config and lineage
    (parent and its manifest's sha256 included), or None: a rerun after an interruption, or to re-evaluate,
    reuses finished rounds and trains the rest; a changed config or parent trains the round again."""
    path = cfg.out_dir / "posterior"
    try:
        manifest = read_manifest(path)
    except ArtifactError:
        return None
    same_config = manifest.get("training", {}).get("config") == cfg.to_dict()
    return path if same_config and manifest.get("lineage") == json.loads(json.dumps(lineage)) else None


def _train_round(cfg: Config, lineage: dict[str, Any], in_process: bool, log: Callable[[str], None]) -> Path:
    done = finished_round(cfg, lineage)
    if done is not None:
        log(f"[rounds] {cfg.output.name}: reusing {done} (same config and parent)")
        return done
    return Path(train(cfg, log, lineage=lineage, in_process=in_process))


def run_retrain(cfg: Config, tasks: Sequence[str], in_process: bool = False,
                log: Callable[[str], None] = print) -> Path:
    """Train the retrain-on-all-data reference (:func:`retrain_config`); returns its artifact."""
    retrain_cfg = retrain_config(cfg, tasks)
    lineage = {**round_lineage("retrain", len(tasks) - 1, ",".join(tasks), None), "pooled_tasks": list(tasks)}
    log(f"[rounds] retrain on all data: {' + '.join(tasks)} pooled, {retrain_cfg.train.steps} steps")
    return _train_round(retrain_cfg, lineage, in_process, log)


def run_chain(cfg: Config, tasks: Sequence[str], chain: str, in_process: bool = False,
              log: Callable[[str], None] = print, first: Path | None = None) -> list[Path]:
    """Train the rounds of one chain; returns the artifact of every round, in order. `first` reuses an
    existing round-0 artifact (round 0 has no parent, so it is the same in every chain)."""
    paths: list[Path] = [first] if first is not None else []
    for t, task in enumerate(tasks):
        if t < len(paths):
            continue
        parent = paths[-1] if paths else None
        round_cfg = round_config(cfg, task, t, chain, parent)
        lineage = round_lineage(chain, t, task, parent)
        log(f"[rounds] {chain} round {t}: {task} (prior: {parent or 'N(0, prior_std²)'})")
        paths.append(_train_round(round_cfg, lineage, in_process, log))
    return paths


def _predict(artifact: Path, test_sets: dict[str, Any], scorer, batch_size: int) -> dict[str, SplitResult]:
    """SplitResults of one round's posterior on the given test splits (name -> dataset)."""
    posterior = load_posterior(artifact, scorer=scorer)
    out = {}
    for name, ds in test_sets.items():
        pred = posterior.predict_dataset(ds, batch_size)
        out[name] = SplitResult(pred.probs.numpy(), np.asarray(ds["label"]), pred.entropy.numpy(),
                                pred.mutual_information.numpy())
    return out


def rejection_curve(result: SplitResult) -> dict[str, list[float]]:
    """Accuracy after rejecting each `REJECTION` fraction of the most uncertain (highest-entropy) examples."""
    acc = [accuracy_at_coverage(result.probs, result.labels, result.entropy, 1.0 - r) for r in REJECTION]
    return {"rejected": list(REJECTION), "accuracy": acc}


def _error_reduction_at_10(curve: dict[str, list[float]]) -> float:
    """Relative error reduction from rejecting the 10 % most uncertain: (err₀ − err₁₀) / err₀."""
    err0, err10 = 1.0 - curve["accuracy"][0], 1.0 - curve["accuracy"][1]
    return (err0 - err10) / err0 if err0 > 0 else 0.0


def evaluate_chain(paths: Sequence[Path], tasks: Sequence[str], test_sets: dict[str, Any], scorer,
                   batch_size: int = 16, rounds: Sequence[int] | None = None,
                   log: Callable[[str], None] = lambda _m: None) -> tuple[dict[str, Any], dict[str, SplitResult]]:
    """(forgetting matrix + last-round rejection curves, last round's SplitResults) of one chain.

    matrix[i][task_j] (j ≤ t) holds accuracy / nll / ece of the posterior after round t = rounds[i] (default
    i) on task j's test split."""
    matrix, last = [], {}
    for t, path in zip(rounds or range(len(paths)), paths):
        seen = {split_name(task): test_sets[split_name(task)] for task in tasks[:t + 1]}
        last = _predict(path, seen, scorer, batch_size)
        row = {}
        for name, r in last.items():
            m = classification_metrics(r.probs, r.labels, r.entropy)
            row[name] = {k: m[k] for k in ("accuracy", "nll", "ece")}
        matrix.append({"round": t, "task": split_name(tasks[t]), "artifact": str(path), "metrics": row})
        log(f"[rounds]   after round {t}: " + ", ".join(f"{n} acc {m['accuracy']:.3f} nll {m['nll']:.3f}"
                                                       for n, m in row.items()))
    curves = {name: rejection_curve(r) for name, r in last.items()}
    return {"forgetting": matrix, "rejection": curves,
            "error_reduction_at_10": {n: _error_reduction_at_10(c) for n, c in curves.items()}}, last


def forgetting_summary(matrix: list[dict[str, Any]]) -> dict[str, Any]:
    """Per earlier task j: accuracy right after its round minus accuracy after the last round (forgetting);
    their mean, and the last round's accuracy on its own (newest) task."""
    last = matrix[-1]["metrics"]
    drop = {row["task"]: row["metrics"][row["task"]]["accuracy"] - last[row["task"]]["accuracy"]
            for row in matrix[:-1] if row["task"] in last}
    return {"forgetting": drop, "mean_forgetting": float(np.mean(list(drop.values()))) if drop else None,
            "newest_accuracy": last[matrix[-1]["task"]]["accuracy"],
            "mean_accuracy": float(np.mean([m["accuracy"] for m in last.values()]))}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def render_rounds_markdown(report: dict[str, Any]) -> str:
    """Markdown: per chain and metric the forgetting matrix (rows: rounds; columns: test tasks), then the
    summary and the last round's accuracy after rejecting the most uncertain examples."""
    tasks = report["tasks"]
    lines = [f"# Dynamic fine-tuning: {' → '.join(tasks)}", ""]
    for chain, result in report["chains"].items():
        for metric in ("accuracy", "nll", "ece"):
            lines += [f"## {chain}: {metric} (row = after round, column = test task)", "",
                      "| round | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
            for row in result["forgetting"]:
                cells = [_fmt(row["metrics"][t][metric]) if t in row["metrics"] else "" for t in tasks]
                lines.append(f"| {row['round']} ({row['task']}) | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["## Summary (after the last round)", "", "| chain | mean forgetting (acc) | newest-task acc | "
              "mean acc over tasks | error reduction @10 % rejected (mean over tasks) |", "|---|---|---|---|---|"]
    for chain, result in report["chains"].items():
        s = result["summary"]
        reduction = float(np.mean(list(result["error_reduction_at_10"].values())))
        lines.append(f"| {chain} | {_fmt(s['mean_forgetting'])} | {_fmt(s['newest_accuracy'])} | "
                     f"{_fmt(s['mean_accuracy'])} | {_fmt(reduction)} |")
    lines += ["", "## Last round: accuracy after rejecting the most uncertain", "",
              "| chain | task | " + " | ".join(f"{int(r * 100)} %" for r in REJECTION) + " |",
              "|---" * (len(REJECTION) + 2) + "|"]
    for chain, result in report["chains"].items():
        for task, curve in result["rejection"].items():
            lines.append(f"| {chain} | {task} | " + " | ".join(_fmt(a) for a in curve["accuracy"]) + " |")
    return "\n".join(lines) + "\n"


def evaluate_rounds(cfg: Config, tasks: Sequence[str], paths: dict[str, list[Path]],
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate every chain's rounds; write report.json, report.md and rejection.png under output.dir."""
    data = {split_name(t): load_task_data(dataclasses.replace(cfg.data, task=t, shift_tasks=())) for t in tasks}
    first = next(iter(data.values()))
    scorer = build_scorer(cfg.model, cfg.adapter, first.spec, cfg.data.max_length)
    test_sets = {name: d.test for name, d in data.items()}
    report: dict[str, Any] = {"tasks": [split_name(t) for t in tasks], "chains": {},
                              "config": cfg.to_dict()}
    last_results = {}
    for chain, chain_paths in paths.items():
        log(f"[rounds] evaluating the {chain} chain ({len(chain_paths)} rounds)")
        rounds = [len(tasks) - 1] if chain == "retrain" else None
        result, last_results[chain] = evaluate_chain(chain_paths, tasks, test_sets, scorer, cfg.train.batch_size,
                                                     rounds, log)
        result["summary"] = forgetting_summary(result["forgetting"])
        report["chains"][chain] = result
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", render_rounds_markdown(report))
    write_coverage_png(out / "rejection.png", last_results, report["tasks"][-1])
    return report


def run_rounds(cfg: Config, tasks: Sequence[str] | None = None, in_process: bool = False,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the dynamic chain (the naive one if `hybrid.compare_naive`, the retrain-on-all-data reference if
    `hybrid.compare_retrain`) over `tasks` (default `hybrid.rounds`), then evaluate and write the report under
    output.dir; returns the report."""
    tasks = list(tasks or cfg.hybrid.rounds)
    if not tasks:
        raise ConfigError("hybrid.rounds: name at least one task (e.g. --rounds movie,tweets,amazon,nyt)")
    chains = [c for c in CHAINS if c == "dynamic" or cfg.hybrid.compare_naive]
    paths: dict[str, list[Path]] = {}
    for chain in chains:
        first = paths["dynamic"][0] if paths else None
        paths[chain] = run_chain(cfg, tasks, chain, in_process, log, first=first)
    if cfg.hybrid.compare_retrain and len(tasks) > 1:
        paths["retrain"] = [run_retrain(cfg, tasks, in_process, log)]
    report = evaluate_rounds(cfg, tasks, paths, log)
    log(f"[rounds] wrote {cfg.out_dir / 'report.md'}, report.json and rejection.png")
    return report
