"""Calibration benchmark: every posterior family against the single adapter, over seeds, with intervals.

    .venv/bin/python benchmarks/calibration.py --config jobs/configs/calibration.yaml --seeds 0,1,2 \
        [--out runs/calibration-bench] [--n-boot 1000] [--json benchmarks/results/calibration.json] [overrides ...]

Each seed s trains the config's members in this process (`data.seed = train.seed = s`: a new training subset,
test split, LoRA init and data order), writes the artifact, and evaluates `posterior.eval_methods` plus
`map_early` (each member's lowest-validation-NLL adapter, `train.keep_best`) on the in-domain test split, the
shift splits and the far-OOD splits. A seed's predictions are kept in `<out>/seed<s>/predictions.npz`, so an
interrupted benchmark resumes at the first unfinished seed; rows a kept seed lacks (a family added to
`posterior.eval_methods`) are evaluated on its artifact. `--extra NAME:OVERRIDES` trains a second run per seed
(e.g. a family with its own training objective, such as BLoB) on the same data and joins its rows to the table.
`--sweep SPACE` builds each seed's members as a hyper-parameter ensemble instead: a train sweep of the space
(`--sweep-samples` Tune samples, each trained to its last step), `posterior.members` of its trials chosen greedily
(:mod:`rayblora.workflows.sweeps.ensemble`), with the feature density fitted on it where `posterior.density`.

Reported per method and split: the seed mean of ACC, NLL, ECE (15 bins), equal-mass ECE, Brier, AURC and the
error reduction when rejecting the 10 % most uncertain; Δ vs `map` (every member alone, averaged) with a 95 %
paired-bootstrap interval (:mod:`rayblora.comparison`); OOD AUROC by mutual information against each far-OOD
split. Writes `--json` (the schema below), a forest plot and reliability diagrams beside it, and prints the
markdown tables for benchmarks/RESULTS.md.

    {"meta": {...}, "tasks": {TASK: {"seeds": S, "in_domain": SPLIT, "n_test": {SPLIT: n}, "methods": {METHOD:
     {SPLIT: {"accuracy", "nll", "ece", ..., "delta_vs_map": {"accuracy": [lo, hi], "nll": [lo, hi],
     "ece": [lo, hi]}}}},
     "far_ood_auroc_mi": {METHOD: x}, "reject10_error_cut": {METHOD: {SPLIT: x}},
     "far_ood_auroc" / "shift_auroc": {METHOD: {SPLIT | "mean": {"entropy", "mi", "density"}}},
     "member_disagreement": {SPLIT: fraction of rows two members answer differently},
     "reject10_by_score": {METHOD: {"entropy", "mi", "density"}},
     "vs_temperature": {SPLIT: {"best": METHOD, "families": {METHOD: {"delta", "lo", "hi"}}}}, "targets": {...}}}}

With `posterior.calibrate: temperature` the rows recalibrated after pooling (`+T`) are Bayesian rows like the others;
with `posterior.density` every row carries the feature distance, and the OOD AUROCs and rejection cuts are given
per score (entropy, MI, density).

`vs_temperature` is ΔNLL = family − temperature-scaled map (one temperature on member 0's probabilities, fitted
on the validation split) with its paired-bootstrap interval, for every Bayesian row; "best" is the row of lowest
seed-mean NLL on that split. That, not raw map, is the baseline a posterior has to beat.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from cells import commit_cell, read_cell, write_cell
from record import BenchmarkRecord
from rayblora.artifact import Artifact, load_posterior, open_artifact
from rayblora.comparison import forest_figure, join, paired_bootstrap, reliability_grid
from rayblora.config import Config, config_from_dict, load_config
from rayblora.data.sources import TaskData, split_name
from rayblora.data.trained_splits import artifact_data
from rayblora.manifest import write_json_atomic
from rayblora.metrics import ood_auroc, rejection_error_reduction
from rayblora.posteriors import get_posterior_class
from rayblora.report import SplitResult, split_metrics
from rayblora.workflows.evaluate import evaluate_methods, member_disagreement, member_view_results
from rayblora.workflows.fit import fit_density
from rayblora.workflows.members import config_digest, early_stopped_adapters, trunk_cache_for
from rayblora.workflows.sweeps import sweep_train
from rayblora.workflows.train import train

FIELDS = ("probs", "labels", "entropy", "mutual_information", "member_probs", "distance")
SCORES = {"entropy": lambda r: r.entropy, "mi": lambda r: r.mutual_information, "density": lambda r: r.distance}
"""The per-input uncertainty scores compared for OOD detection and rejection (density: the feature distance)."""
TABLE = (("accuracy", "ACC"), ("nll", "NLL"), ("ece", "ECE"), ("ece_em", "ECE-EM"), ("brier", "Brier"),
         ("aurc", "AURC"), ("reject10", "Rej10"))
BAYESIAN = ("ensemble", "multiswag", "laplace")
"""The families the in-domain targets are stated for."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- one seed ---------------------------------------------------------------------------------------------------
def seed_config(args, seed: int, extra: tuple[str, list[str]] | None = None) -> Config:
    """The config of seed `seed`; with `extra` = (name, overrides), that extra run's (output `seed<s>-<name>`)."""
    name, more = extra or ("", [])
    out = Path(args.out) / (f"seed{seed}-{name}" if name else f"seed{seed}")
    return load_config(args.config, [*args.overrides, *more, f"data.seed={seed}", f"train.seed={seed}",
                                      f"output.dir={out}", f"output.name=calibration-seed{seed}{name}"])


def parse_extra(text: str) -> tuple[str, list[str]]:
    """`NAME:OVERRIDE OVERRIDE ...` (e.g. "blob:posterior.method=blob posterior.members=1") -> (NAME, overrides)."""
    name, sep, rest = text.partition(":")
    if not sep or not name.isidentifier() or not rest.split():
        raise SystemExit(f"--extra {text!r}: expected NAME:OVERRIDES, e.g. 'blob:posterior.method=blob'")
    return name, rest.split()


def merge_extra(results: dict[str, dict[str, SplitResult]], extra: dict[str, dict[str, SplitResult]],
                methods: list[str], name: str) -> None:
    """Add an extra run's `methods` rows to a seed's results; its splits must hold the same rows (labels)."""
    for m in methods:
        for split, row in extra[m].items():
            if not np.array_equal(row.labels, results["map"][split].labels):
                raise SystemExit(f"--extra {name}: its {split} rows differ from the main run's (data section?)")
        results[m] = extra[m]


def early_stopped_rows(artifact: Artifact, cfg: Config, data: TaskData) -> dict[str, dict[str, SplitResult]]:
    """The early-stopped rows on every evaluation split, from one pass over each member's lowest-validation-NLL
    adapter (`train.keep_best`): `map_early` (each alone, a member row) and `ensemble_early` (their average,
    the deep-ensemble recipe of arXiv 2402.12264 rather than an ensemble of over-fitted end points)."""
    full = load_posterior(artifact)
    full.scorer.use_trunk_cache(trunk_cache_for(cfg, full.scorer, log))
    early = get_posterior_class("ensemble")(full.scorer, early_stopped_adapters(cfg))
    out: dict[str, dict[str, SplitResult]] = {"map_early": {}, "ensemble_early": {}}
    for name, ds in data.eval_splits(split_name(cfg.data.task)).items():
        views = member_view_results(early.predict_dataset(ds, 16), ds["label"], ["map", "ensemble"])
        out["map_early"][name], out["ensemble_early"][name] = views["map"], views["ensemble"]
    return out


def seed_artifact(args, cfg: Config) -> Path:
    """The seed's posterior artifact: its members trained in this process, or with `--sweep` a hyper-parameter
    ensemble of `posterior.members` trials of a train sweep (Wenzel et al., NeurIPS 2020, sec. 3), every trial
    trained to its last step (ASHA's first rung at the last step), its feature density fitted where asked."""
    if not args.sweep:
        return train(cfg, log, in_process=True)
    outcome = sweep_train(cfg, args.sweep, cfg.out_dir / "sweep", num_samples=args.sweep_samples,
                          grace_period=cfg.train.steps, ensemble_size=cfg.posterior.members, log=log)
    if not cfg.posterior.density:
        return outcome.ensemble
    return fit_density(outcome.ensemble, cfg, cfg.out_dir / "posterior", log)


def cell_digest(args, cfg: Config) -> str:
    """What a seed's cell was measured under: the config's training digest, with `--sweep` also the search
    space's text and the sample count (`args.sweep_identity`, read once in :func:`main`)."""
    if not args.sweep:
        return config_digest(cfg)
    return hashlib.sha256(f"{config_digest(cfg)}|{args.sweep_identity}".encode()).hexdigest()[:16]


def run_seed(args, cfg: Config, early: bool = True
             ) -> tuple[dict[str, dict[str, SplitResult]], dict[str, float], dict[str, list[str]]]:
    """Train and evaluate one seed: (results[method][split], seconds {"train", "evaluate", "fit:<method>"}, the
    evaluation splits' row ids); with `early`, the `map_early` rows too."""
    t0 = time.time()
    artifact = open_artifact(seed_artifact(args, cfg))
    train_s = time.time() - t0
    fits: dict[str, float] = {}
    data = artifact_data(artifact, cfg.data, log)
    results = evaluate_methods(artifact, cfg, cfg.posterior.eval_methods, data=data, log=log, timings=fits)
    if early:
        results.update(early_stopped_rows(artifact, cfg, data))
    eval_s = time.time() - t0 - train_s
    log(f"seed done: training {train_s:.0f} s, evaluation {eval_s:.0f} s")
    density = artifact.manifest.get("density", {})
    return results, {"train": train_s, "evaluate": eval_s, **{f"fit:{m}": v for m, v in fits.items()},
                     **({"fit:density": density["seconds"]} if "seconds" in density else {})}, split_ids(data, cfg)


def save_seed(path: Path, cfg: Config, digest: str, results: dict[str, dict[str, SplitResult]],
              seconds: dict[str, float], row_ids: dict[str, list[str]], record: BenchmarkRecord) -> None:
    """Write a seed's cell (:mod:`cells`): "<method>/<split>/<field>" arrays and "ids/<split>" (each split's row
    ids "<task>:<row>"), with the wall seconds of each phase and the config."""
    arrays = {f"{m}/{s}/{f}": getattr(r, f) for m, splits in results.items() for s, r in splits.items()
              for f in FIELDS if getattr(r, f) is not None}
    arrays.update({f"ids/{s}": np.asarray(row_ids[s], dtype=str) for s in results["map"]})
    write_cell(path, arrays, digest, record, seconds=seconds, config=cfg.to_dict())


def split_ids(data: TaskData, cfg: Config) -> dict[str, list[str]]:
    """Row ids of every evaluation split of a seed's `data`, by split name (the in-domain test split by its task's
    name)."""
    names = {"test": split_name(cfg.data.task)}
    return {names.get(k, k): v for k, v in data.ids.items() if k not in ("train", "validation")}


def load_seed(args, path: Path, cfg: Config) -> dict[str, dict[str, SplitResult]] | None:
    """A finished seed's predictions, if they were made with this config (and sweep)."""
    arrays = read_cell(path, cell_digest(args, cfg), lambda meta: cell_digest(args, config_from_dict(meta["config"])))
    if arrays is None:
        return None
    keys = {tuple(k.split("/")) for k in arrays if not k.startswith("ids/")}
    out: dict[str, dict[str, SplitResult]] = {}
    for m, s in sorted({(m, s) for m, s, _ in keys}):
        out.setdefault(m, {})[s] = SplitResult(**{f: arrays[f"{m}/{s}/{f}"] for f in FIELDS if (m, s, f) in keys})
    return out


def cell_path(args, cfg: Config, seed: int, extra: tuple[str, list[str]] | None = None) -> Path:
    """Where a seed's predictions are kept: `<--cells>/seed<s>[-<extra>].npz` (committed cells), else
    `<output.dir>/predictions.npz` beside its artifact."""
    if not args.cells:
        return cfg.out_dir / "predictions.npz"
    return Path(args.cells) / (f"seed{seed}-{extra[0]}.npz" if extra else f"seed{seed}.npz")


def seed_results(args, seed: int, extra: tuple[str, list[str]] | None = None) -> dict[str, dict[str, SplitResult]]:
    """A seed's rows: kept predictions where they were made with this config, the rows they lack evaluated on
    the seed's artifact (e.g. a family added to `posterior.eval_methods`; a new run where it is gone), else a
    new training run. With `--commit`, a cell written is committed at once."""
    cfg = seed_config(args, seed, extra)
    path = cell_path(args, cfg, seed, extra)
    kept = load_seed(args, path, cfg)
    missing = [m for m in cfg.posterior.eval_methods if kept is not None and m not in kept]
    artifact = cfg.out_dir / "posterior"
    if kept is not None and missing and not artifact.is_dir():
        log(f"seed {seed}: {path} lacks rows {missing} and its artifact {artifact} is gone: training it again")
        kept = None
    t0, record = time.time(), BenchmarkRecord()
    if kept is None:
        results, seconds, row_ids = run_seed(args, cfg, early=extra is None and not args.sweep)
        save_seed(path, cfg, cell_digest(args, cfg), results, seconds, row_ids, record)
        results = load_seed(args, path, cfg)  # as stored: a rerun that finds this cell aggregates the same numbers
    else:
        log(f"seed {seed}: predictions kept from an earlier run ({path})"
            + (f"; evaluating the rows it lacks: {missing}" if missing else ""))
        if not missing:
            return kept
        fits: dict[str, float] = {}
        opened = open_artifact(artifact)
        data = artifact_data(opened, cfg.data, log)
        kept.update(evaluate_methods(opened, cfg, missing, data=data, log=log, timings=fits))
        save_seed(path, cfg, cell_digest(args, cfg), kept, {**seed_seconds(path), "+".join(missing): time.time() - t0,
                                    **{f"fit:{m}": s for m, s in fits.items()}}, split_ids(data, cfg), record)
        results = load_seed(args, path, cfg)
    if args.commit:
        commit_cell(path, f"{split_name(cfg.data.task)} seed {seed}")
    return results


def seed_seconds(path: Path) -> dict[str, float]:
    """Wall seconds of a kept seed's runs so far ({"train", "evaluate", "fit:<method>"}, or {"all"} from a run
    before they were split; "<methods>" for each later addition of rows)."""
    seconds = json.loads(path.with_suffix(".json").read_text())["seconds"]
    return seconds if isinstance(seconds, dict) else {"all": float(seconds)}


# --- aggregation ------------------------------------------------------------------------------------------------
def mean_seconds(paths: list[Path]) -> dict[str, float]:
    """Seed-mean wall seconds of each recorded phase (training, evaluation, each family's post-hoc fit)."""
    runs = [seed_seconds(p) for p in paths]
    keys = sorted({k for r in runs for k in r})
    return {k: float(np.mean([r[k] for r in runs if k in r])) for k in keys}


def _metrics(result: SplitResult) -> dict[str, float]:
    """The report's metrics of one row (members' mean for a member row), scalars only (not "sd" / "members")."""
    return {k: v for k, v in split_metrics(result).items() if isinstance(v, float)}


def split_table(per_seed: list[dict], split: str, methods: list[str], n_boot: int) -> dict[str, dict]:
    rows = {m: [seed[m][split] for seed in per_seed] for m in methods}
    deltas = paired_bootstrap(rows, "map", n_boot=n_boot)
    out = {}
    for m in methods:
        seeds = [_metrics(r) for r in rows[m]]
        means = {k: float(np.nanmean([s[k] for s in seeds])) for k in seeds[0]}
        sds = {k: float(np.nanstd([s[k] for s in seeds], ddof=1)) if len(seeds) > 1 else 0.0 for k in seeds[0]}
        out[m] = {**means, "sd_over_seeds": sds, "delta_vs_map": {k: [v["lo"], v["hi"]] for k, v in deltas[m].items()},
                  "delta_mean": {k: v["delta"] for k, v in deltas[m].items()}}
    return out


def far_ood_aurocs(per_seed: list[dict], in_domain: str, far: list[str], methods: list[str]) -> dict[str, float]:
    """Mean over seeds (and far-OOD sets) of the AUROC of MI separating in-domain from far-OOD rows."""
    return {m: float(np.mean([ood_auroc(seed[m][in_domain].mutual_information, seed[m][f].mutual_information)
                              for seed in per_seed for f in far])) for m in methods if far}


def score_aurocs(per_seed: list[dict], in_domain: str, others: list[str], methods: list[str]) -> dict[str, dict]:
    """Seed-mean AUROC of each score (entropy, MI, density) separating in-domain rows from each split of `others`
    (positive), per method: {METHOD: {SPLIT: {SCORE: x}, "mean": {SCORE: x over the splits}}}; a score a row
    lacks (density without a feature density) is left out."""
    out = {}
    for m in methods:
        rows = {}
        for split in others:
            rows[split] = {name: float(np.mean([ood_auroc(score(seed[m][in_domain]), score(seed[m][split]))
                                                for seed in per_seed]))
                           for name, score in SCORES.items() if score(per_seed[0][m][in_domain]) is not None}
        rows["mean"] = {name: float(np.mean([rows[s][name] for s in others])) for name in rows[others[0]]}
        out[m] = rows
    return out


def reject10_by_score(per_seed: list[dict], in_domain: str, methods: list[str]) -> dict[str, dict[str, float]]:
    """Seed-mean in-domain error reduction when the 10 % of rows highest by each score are rejected."""
    return {m: {name: float(np.mean([rejection_error_reduction(seed[m][in_domain].probs, seed[m][in_domain].labels,
                                                               score(seed[m][in_domain]), 0.1) for seed in per_seed]))
                for name, score in SCORES.items() if score(per_seed[0][m][in_domain]) is not None}
            for m in methods if per_seed[0][m][in_domain].member_probs is None}


def seed_disagreement(per_seed: list[dict], splits: list[str]) -> dict[str, float]:
    """Seed-mean :func:`member_disagreement` of `map`'s member probabilities (M, N, C), per split: how far the
    recipe made its members differ."""
    return {s: float(np.mean([member_disagreement(torch.as_tensor(seed["map"][s].member_probs)) for seed in per_seed]))
            for s in splits if per_seed[0]["map"][s].member_probs is not None}


def targets(task: dict, in_domain: str, shifts: list[str]) -> dict[str, object]:
    """The issue's pass/fail checks, computed from the tables (not asserted: a benchmark reports)."""
    table, out = task["methods"], {}
    base = table["map"][in_domain]
    for m in (m for m in BAYESIAN if m in table):
        row = table[m][in_domain]
        out[f"{m}_in_domain"] = {
            "nll_ratio": row["nll"] / base["nll"], "ece_ratio": row["ece"] / base["ece"],
            "accuracy_drop": base["accuracy"] - row["accuracy"],
            "pass": bool(row["nll"] <= 0.8 * base["nll"] and row["ece"] <= 0.5 * base["ece"]
                         and row["accuracy"] >= base["accuracy"] - 0.01 and row["delta_vs_map"]["nll"][1] < 0
                         and row["delta_vs_map"]["ece"][1] < 0)}
    bayes = bayesian_rows(table)
    best = {s: min(bayes, key=lambda m: table[m][s]["nll"]) for s in shifts}
    out["shift_best_beats_temperature"] = {s: {"best": best[s], "nll": table[best[s]][s]["nll"],
                                               "temperature_nll": table["temperature"][s]["nll"]}
                                           for s in shifts if "temperature" in table}
    out["shift_pass"] = sum(v["nll"] < v["temperature_nll"] for v in out["shift_best_beats_temperature"].values()) >= 2
    out["far_ood_auroc_mi_pass"] = {m: task["far_ood_auroc_mi"].get(m, float("nan")) >= 0.8
                                    for m in ("ensemble", "multiswag")}
    out["vs_temperature"] = {s: {"best": v["best"], **v["families"][v["best"]],
                                 "pass": v["families"][v["best"]]["hi"] < 0}
                             for s, v in task["vs_temperature"].items()}
    wins = sum(out["vs_temperature"].get(s, {}).get("pass", False) for s in shifts)
    in_domain_won = bool(out["vs_temperature"].get(in_domain, {}).get("pass"))
    out["vs_temperature_pass"] = in_domain_won and wins >= min(2, len(shifts))
    out["far_ood_auroc_mi_max"] = max(task["far_ood_auroc_mi"].values(), default=float("nan"))
    out["reject10_error_cut_max"] = max(v[in_domain] for v in task["reject10_error_cut"].values())
    out.update(density_targets(task))
    return out


def density_targets(task: dict) -> dict[str, object]:
    """Issue 34's checks: far-OOD AUROC by density ≥ 0.98 on each far-OOD set, its shift AUROC ≥ 0.85 averaged
    over the shift splits (the best row of each), and the best in-domain reject-10 % cut ≥ 0.30 over every row
    and score."""
    out: dict[str, object] = {}
    dens = {m: v for m, v in task["far_ood_auroc"].items() if "density" in v.get("mean", {})}
    if dens:
        best = max(dens, key=lambda m: dens[m]["mean"]["density"])
        each = {s: v["density"] for s, v in dens[best].items() if s != "mean"}
        out["far_ood_density"] = {"row": best, **each, "pass": all(v >= 0.98 for v in each.values())}
    shift = {m: v["mean"]["density"] for m, v in task["shift_auroc"].items() if "density" in v.get("mean", {})}
    if shift:
        best = max(shift, key=shift.get)
        out["shift_density"] = {"row": best, "mean": shift[best], "pass": shift[best] >= 0.85}
    cuts = [(v, m, score) for m, scores in task["reject10_by_score"].items() for score, v in scores.items()]
    value, row, score = max(cuts)
    out["reject10_best"] = {"row": row, "score": score, "cut": value, "pass": value >= 0.30}
    return out


def bayesian_rows(methods) -> list[str]:
    """The rows that are posteriors, not one adapter with or without a temperature."""
    return [m for m in methods if m not in ("map", "temperature", "map_early", "temperature_ensemble")]


def vs_temperature(per_seed: list[dict], splits: list[str], n_boot: int) -> dict[str, dict]:
    """Per split: ΔNLL of every Bayesian row against temperature-scaled map, paired bootstrap over the seeds'
    rows, and the row of lowest seed-mean NLL ("best"). Empty without a `temperature` row."""
    if "temperature" not in per_seed[0]:
        return {}
    out = {}
    for s in splits:
        rows = {m: [seed[m][s] for seed in per_seed] for m in ["temperature", *bayesian_rows(per_seed[0])]}
        deltas = paired_bootstrap(rows, "temperature", metric_names=("nll",), n_boot=n_boot)
        families = {m: d["nll"] for m, d in deltas.items() if m != "temperature"}
        out[s] = {"best": min(families, key=lambda m: families[m]["delta"]), "families": families}
    return out


def aggregate(per_seed: list[dict], cfg: Config, n_boot: int) -> tuple[dict, dict]:
    in_domain = split_name(cfg.data.task)
    far = [split_name(t) for t in cfg.data.far_ood_tasks]
    splits = [s for s in per_seed[0]["map"] if s not in far]
    methods = ["map", *[m for m in per_seed[0] if m != "map"]]
    log(f"bootstrap ({n_boot} replicates) over {len(per_seed)} seeds, {len(splits)} splits, {len(methods)} rows")
    tables = {s: split_table(per_seed, s, methods, n_boot) for s in splits}
    task = {"seeds": len(per_seed), "in_domain": in_domain,
            "n_test": {s: int(len(per_seed[0]["map"][s].labels)) for s in [*splits, *far]},
            "methods": {m: {s: tables[s][m] for s in splits} for m in methods},
            "far_ood_auroc_mi": far_ood_aurocs(per_seed, in_domain, far, methods),
            "far_ood_auroc": score_aurocs(per_seed, in_domain, far, methods) if far else {},
            "shift_auroc": score_aurocs(per_seed, in_domain, [s for s in splits if s != in_domain], methods)
            if len(splits) > 1 else {},
            "reject10_by_score": reject10_by_score(per_seed, in_domain, methods),
            "reject10_error_cut": {m: {s: tables[s][m]["reject10"] for s in splits} for m in methods},
            "member_disagreement": seed_disagreement(per_seed, [*splits, *far]),
            "vs_temperature": vs_temperature(per_seed, splits, n_boot)}
    task["targets"] = targets(task, in_domain, [s for s in splits if s != in_domain])
    deltas = {s: {m: {k: {"delta": tables[s][m]["delta_mean"][k], "lo": tables[s][m]["delta_vs_map"][k][0],
                          "hi": tables[s][m]["delta_vs_map"][k][1]} for k in ("nll", "ece", "accuracy")}
                  for m in methods} for s in splits}
    return task, deltas


def markdown(task_name: str, task: dict) -> str:
    lines = [f"### {task_name}: {task['seeds']} seeds, test rows {task['n_test']}", ""]
    for split in next(iter(task["methods"].values())):
        lines += [f"**{split}**", "", "| Method | " + " | ".join(h for _, h in TABLE) +
                  " | ΔNLL [95 % CI] | ΔECE [95 % CI] | ΔACC [95 % CI] |",
                  "|---|" + "---:|" * (len(TABLE) + 3)]
        for m, per_split in task["methods"].items():
            row = per_split[split]
            cis = [f"{row['delta_mean'][k]:+.4f} [{row['delta_vs_map'][k][0]:+.4f}, {row['delta_vs_map'][k][1]:+.4f}]"
                   for k in ("nll", "ece", "accuracy")]
            lines.append(f"| {m} | " + " | ".join(f"{row[k]:.4f}" for k, _ in TABLE) + " | " + " | ".join(cis) + " |")
        lines.append("")
    for split, row in task["vs_temperature"].items():
        lines.append(f"ΔNLL vs temperature-scaled map, {split}: " + ", ".join(
            f"{m} {d['delta']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]" for m, d in row["families"].items())
            + f" (best: {row['best']})")
    lines.append("")
    for title, key in (("Far-OOD", "far_ood_auroc"), ("Shift", "shift_auroc")):
        lines += auroc_table(title, task.get(key, {}))
    if task.get("reject10_by_score"):
        lines += ["In-domain error cut when rejecting the 10 % highest by each score:", "",
                  "| Method | entropy | MI | density |", "|---|---:|---:|---:|"]
        lines += [f"| {m} | " + " | ".join(f"{v[s]:.3f}" if s in v else "n/a" for s in SCORES) + " |"
                  for m, v in task["reject10_by_score"].items()]
        lines.append("")
    for run, phases in task.get("seconds_per_seed", {}).items():
        lines += [f"Seconds per seed ({run} run): " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()), ""]
    return "\n".join(lines)


def auroc_table(title: str, aurocs: dict[str, dict]) -> list[str]:
    """Markdown rows: per method, each split's AUROC by entropy / MI / density."""
    if not aurocs:
        return []
    splits = [s for s in next(iter(aurocs.values())) if s != "mean"] + ["mean"]
    lines = [f"{title} AUROC (seed mean; entropy / MI / density):", "",
             "| Method | " + " | ".join(splits) + " |", "|---|" + "---:|" * len(splits)]
    for m, rows in aurocs.items():
        lines.append(f"| {m} | " + " | ".join(" / ".join(f"{rows[s][k]:.3f}" if k in rows[s] else "–"
                                                          for k in SCORES) for s in splits) + " |")
    return lines + [""]


def write_figures(json_path: Path, task_name: str, deltas: dict, per_seed: list[dict], in_domain: str) -> None:
    stem = json_path.with_suffix("")
    forest_figure(deltas, ["nll", "ece"]).savefig(f"{stem}_{task_name}_forest.png", dpi=110)
    pooled = {m: join([seed[m][in_domain] for seed in per_seed]) for m in per_seed[0]}
    reliability_grid(pooled).savefig(f"{stem}_{task_name}_reliability.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="jobs/configs/calibration.yaml")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="runs/calibration-bench")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--json", default="benchmarks/results/calibration.json")
    parser.add_argument("--task-name", default="", help="key of this task in the JSON (default: data.task's name)")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME:OVERRIDES",
                        help="another training run per seed whose posterior.eval_methods rows join the table "
                             "(same data, so the same test rows), e.g. 'blob:posterior.method=blob "
                             "posterior.members=1 posterior.eval_methods=[blob,blob_mean]'")
    parser.add_argument("--cells", default="", metavar="DIR",
                        help="keep each seed's predictions as DIR/seed<s>.npz + .json (a committed campaign cell, "
                             "e.g. benchmarks/results/campaign/obqa/seed) instead of beside its artifact")
    parser.add_argument("--commit", action="store_true", help="git-commit each cell as it is written")
    parser.add_argument("--sweep", default="", metavar="SPACE",
                        help="members as a hyper-parameter ensemble chosen from a train sweep of this search-space "
                             "YAML (rayblora sweep train --ensemble posterior.members)")
    parser.add_argument("--sweep-samples", type=int, default=8, help="Tune samples of the --sweep space")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.test_size=500")
    args = parser.parse_args()
    args.sweep_identity = f"{Path(args.sweep).read_text()}|{args.sweep_samples}" if args.sweep else ""
    record = BenchmarkRecord()
    seeds = [int(s) for s in args.seeds.split(",")]
    extras = [parse_extra(e) for e in args.extra]
    per_seed = [seed_results(args, s) for s in seeds]
    cfg = seed_config(args, seeds[0])
    task_name = args.task_name or split_name(cfg.data.task)
    seconds = {"": mean_seconds([cell_path(args, seed_config(args, s), s) for s in seeds])}
    for extra in extras:
        methods = list(seed_config(args, seeds[0], extra).posterior.eval_methods)
        for s, results in zip(seeds, per_seed):
            merge_extra(results, seed_results(args, s, extra), methods, extra[0])
        seconds[extra[0]] = mean_seconds([cell_path(args, seed_config(args, s, extra), s, extra) for s in seeds])
    task, deltas = aggregate(per_seed, cfg, args.n_boot)
    task["seconds_per_seed"] = {"main": seconds.pop(""), **seconds}
    json_path = Path(args.json)
    previous = json.loads(json_path.read_text()).get("tasks", {}) if json_path.is_file() else {}
    write_json_atomic(json_path, {"meta": {**record.meta(), "seeds": seeds, "config": args.config,
                                           "overrides": args.overrides},
                                  "tasks": {**previous, task_name: task}}, allow_nan=True)
    file_stem = task_name.replace("/", "_")  # a campaign's "<task>/<recipe>"
    write_figures(json_path, file_stem, deltas, per_seed, split_name(cfg.data.task))
    text = markdown(task_name, task)
    (json_path.parent / f"{json_path.stem}_{file_stem}.md").write_text(text)
    print(text)
    print(json.dumps(task["targets"], indent=1))


if __name__ == "__main__":
    main()
