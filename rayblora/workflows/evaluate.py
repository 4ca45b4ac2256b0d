"""Evaluate posterior families on the in-domain test split and the shift splits, and write the report.

Member views (`map`, `ensemble`) of one artifact share a single pass per member: the per-member
probabilities are computed once per split. The `map` row is every member evaluated alone, reported as the mean
± sd over members (not member 0's luck of the draw).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from rayblora import predictive
from rayblora.artifact import Artifact, load_posterior, open_artifact
from rayblora.config import Config
from rayblora.data.sources import TaskData, split_name
from rayblora.data.trained_splits import artifact_data
from rayblora.posteriors.baselines import fit_temperature
from rayblora.registry import get_posterior_class
from rayblora.report import SplitResult, render_markdown, write_report
from rayblora.workflows.generation import evaluate_generation_report
from rayblora.workflows.members import trunk_cache_for
from rayblora.workflows.views import buildable_methods

MEMBER_VIEWS = ("map", "ensemble", "temperature", "temperature_ensemble")
"""Rows computed from one pass of the members over a split (the temperature rows rescale it)."""


CALIBRATION_SPLIT = "_calibration"
"""The name under which the calibrated rows' fit sees the validation split (`posterior.calibrate`); never
reported."""


def _split_result(pred: predictive.Predictive, labels, density=None, extra=None, **fields) -> SplitResult:
    """A report row; `density` (the posterior's FeatureDensity) adds the in-distribution rate to its metrics."""
    distance = None if pred.distance is None else pred.distance.numpy()
    if distance is not None and density is not None:
        extra = {**(extra or {}), "in_distribution": float(pred.in_distribution.float().mean()),
                 "density_threshold": density.threshold}
    return SplitResult(pred.probs.numpy(), np.asarray(labels), pred.entropy.numpy(),
                       pred.mutual_information.numpy(), distance=distance, extra=extra, **fields)


def pooled_temperature_rows(results: dict[str, dict[str, SplitResult]],
                            calibration: dict[str, SplitResult]) -> dict[str, dict[str, SplitResult]]:
    """Calibration after pooling (Ashukha et al., ICLR 2020, "Pitfalls of in-domain uncertainty estimation",
    sec. 4): for each row with predictions on the calibration split, one temperature T fitted there to its
    predictive p (the BMA, not the samples), and the row `<name>+T` with softmax(log p / T) on every split (the
    entropy recomputed; the posterior's mutual information and feature distance kept)."""
    out = {}
    for name, val in calibration.items():
        temperature = fit_temperature(torch.from_numpy(_log(val.probs)).float(), torch.as_tensor(val.labels))
        out[f"{name}+T"] = {split: _tempered(r, temperature) for split, r in results[name].items()}
    return out


def _log(probs: np.ndarray) -> np.ndarray:
    return np.where(probs > 0, np.log(np.clip(probs, 1e-30, None)), -np.inf)


def _tempered(result: SplitResult, temperature: float) -> SplitResult:
    probs = torch.softmax(torch.from_numpy(_log(result.probs) / temperature), -1)
    return SplitResult(probs.numpy(), result.labels, predictive.entropy(probs).numpy(), result.mutual_information,
                       distance=result.distance, extra={**(result.extra or {}), "temperature": temperature})


def member_disagreement(sample_probs) -> float:
    """Mean over member pairs of the fraction of inputs on which their argmax differs; sample_probs (K, N, C)."""
    labels = sample_probs.argmax(-1)
    k = labels.shape[0]
    pairs = [(labels[i] != labels[j]).float().mean() for i in range(k) for j in range(i + 1, k)]
    return float(sum(pairs) / len(pairs)) if pairs else 0.0


def member_view_results(pred: predictive.Predictive, labels, views, scaled=None,
                        density=None) -> dict[str, SplitResult]:
    """The member views of one pass over the members: `map` = each member alone (reported as mean ± sd over
    members, plotted as member 0), `ensemble` = their average (with the members' pairwise disagreement), and
    the fitted temperature posteriors in `scaled` (name -> posterior) applied to the same probabilities; every
    row carries the pass's feature-density scores (where the members have a `density`)."""
    def scored(p: predictive.Predictive) -> predictive.Predictive:
        return p if pred.distance is None else p.with_density(pred.distance, pred.log_density, pred.in_distribution)

    out = {name: _split_result(scored(post.rescale(pred.sample_probs)), labels, density)
           for name, post in (scaled or {}).items()}
    if "map" in views:
        alone = predictive.from_sample_probs(pred.sample_probs[:1])
        out["map"] = _split_result(scored(alone), labels, density, member_probs=pred.sample_probs.numpy())
    if "ensemble" in views:
        out["ensemble"] = _split_result(pred, labels, density,
                                        extra={"member_disagreement": member_disagreement(pred.sample_probs)})
    return out


def _progress(log: Callable[[str], None], what: str) -> Callable[[int, int], None]:
    state = {"next": 0.0, "t0": time.time()}

    def report(done: int, total: int) -> None:
        if done >= total or time.time() >= state["next"]:
            log(f"[evaluate] {what}: {done}/{total} ({time.time() - state['t0']:.0f} s)")
            state["next"] = time.time() + 30

    return report


RowSource = Callable[[Any, Callable[[int, int], None]], dict[str, SplitResult]]
"""One pass over a split (a dataset, a progress callback) -> the report rows it yields, by method name."""


def _family_rows(post, batch_size: int) -> RowSource:
    """A family's rows: its own and those it provides from the same pass (:attr:`Posterior.provides`)."""
    def rows(ds, progress) -> dict[str, SplitResult]:
        return {view: _split_result(pred, ds["label"], post.density)
                for view, pred in post.predict_dataset_views(ds, batch_size, progress).items()}
    return rows


def _member_rows(full, views: Sequence[str], scaled: dict, batch_size: int) -> RowSource:
    """The member views' rows from one pass of the members (:func:`member_view_results`)."""
    ensemble = full.view("ensemble")

    def rows(ds, progress) -> dict[str, SplitResult]:
        pred = ensemble.predict_dataset(ds, batch_size, progress)
        return member_view_results(pred, ds["label"], views, scaled, full.density)
    return rows


def _row_sources(full, methods: Sequence[str], data: TaskData, cfg: Config, log: Callable[[str], None],
                 timings: dict[str, float], batch_size: int) -> dict[str, RowSource]:
    """One pass per source: `members` for the member views (the temperature rows fitted here), and each other
    method once, except those another one provides from its own pass. Post-hoc families fit here (Laplace
    curvature, TFB's σ search); each one's seconds go into `timings`."""
    def prepared(m: str):
        t0 = time.time()
        log(f"[evaluate] preparing {m}")
        post = full.view(m, data=data, config=cfg)
        timings[m] = time.time() - t0
        log(f"[evaluate] {m} ready ({timings[m]:.0f} s)")
        return post

    member_views = [m for m in methods if m in MEMBER_VIEWS]
    others = [m for m in methods if m not in MEMBER_VIEWS]
    provided = {v for m in others for v in get_posterior_class(m).provides if v != m}
    sources: dict[str, RowSource] = {}
    if member_views:
        scaled = {m: prepared(m) for m in member_views if m.startswith("temperature")}
        sources["members"] = _member_rows(full, member_views, scaled, batch_size)
    sources.update({m: _family_rows(prepared(m), batch_size) for m in others if m not in provided})
    return sources


def evaluate_methods(artifact: Artifact, cfg: Config, methods: Sequence[str] | None = None,
                     data: TaskData | None = None, log: Callable[[str], None] = print,
                     batch_size: int = 16, timings: dict[str, float] | None = None
                     ) -> dict[str, dict[str, SplitResult]]:
    """Predictions of each method on every evaluation split: results[method][split]. `methods` given: each must
    be one this artifact can build (else ConfigError before any model loads); default `posterior.eval_methods`,
    those it cannot build skipped with a log line (:func:`~rayblora.workflows.views.buildable_methods`).
    `timings`, if given, receives seconds: each built family's preparation under its name (its post-hoc fit; 0 for
    families that only load), and its passes over the splits under `predict:<name>` (`predict:members` for the
    member views)."""
    methods = buildable_methods(artifact, methods, cfg.posterior.eval_methods, log)
    timings = timings if timings is not None else {}
    data = data or artifact_data(artifact, cfg.data, log)
    splits = data.eval_splits(split_name(cfg.data.task))
    full = load_posterior(artifact)
    full.scorer.use_trunk_cache(trunk_cache_for(cfg, full.scorer, log))
    results: dict[str, dict[str, SplitResult]] = {m: {} for m in methods}
    sources = _row_sources(full, methods, data, cfg, log, timings, batch_size)
    if cfg.posterior.calibrate == "temperature":
        splits = {**splits, CALIBRATION_SPLIT: data.validation}
    for name, ds in splits.items():
        for source, rows in sources.items():
            t0 = time.time()
            for view, row in rows(ds, _progress(log, f"{source} on {name}")).items():
                if view in results:
                    results[view][name] = row
            timings[f"predict:{source}"] = timings.get(f"predict:{source}", 0.0) + time.time() - t0
    if full.scorer.trunk_cache is not None:
        log(f"[evaluate] {full.scorer.trunk_cache.summary()}")
    if cfg.posterior.calibrate == "temperature":
        calibration = {m: results[m].pop(CALIBRATION_SPLIT) for m in methods}
        results.update(pooled_temperature_rows(results, {m: r for m, r in calibration.items()
                                                         if not _is_calibrated(m)}))
    return results


def _is_calibrated(method: str) -> bool:
    """Rows that are a temperature already (the map row's is `temperature`): no `+T` row of their own."""
    return method == "map" or method.startswith("temperature")


def evaluate_artifact(path: str | Path, cfg: Config, out_dir: str | Path | None = None,
                      methods: Sequence[str] | None = None, log: Callable[[str], None] = print) -> dict:
    """`rayblora evaluate`: open the artifact at `path` once and evaluate it as its task asks — answer
    probabilities (:func:`evaluate`) or generated answers (exact match and answer-level uncertainty,
    :func:`~rayblora.workflows.generation.evaluate_generation_report`); logs the table, returns the report."""
    artifact = open_artifact(path)
    if artifact.manifest["task"]["kind"] == "generation":
        return evaluate_generation_report(artifact, cfg, out_dir=out_dir, methods=methods, log=log)
    report = evaluate(artifact, cfg, out_dir=out_dir, methods=methods, log=log)
    log(render_markdown(report))
    log(f"[report] {Path(out_dir or cfg.out_dir)}/report.json, report.md, reliability.png, coverage.png")
    return report


def evaluate(artifact: Artifact, cfg: Config, out_dir: str | Path | None = None,
             methods: Sequence[str] | None = None, log: Callable[[str], None] = print) -> dict:
    """Evaluate and write report.json / report.md / reliability.png / coverage.png; returns the report."""
    t0 = time.time()
    results = evaluate_methods(artifact, cfg, methods, log=log)
    manifest = artifact.manifest
    meta = {"model": manifest["base_model"]["name"], "task": cfg.data.task,
            "members": len(manifest["members"]), "steps": cfg.train.steps, "lora_rank": cfg.adapter.rank,
            "artifact": str(artifact.root), "eval_seconds": round(time.time() - t0, 1)}
    out = Path(out_dir or cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return write_report(out, results, split_name(cfg.data.task), meta,
                        far_ood=[split_name(t) for t in cfg.data.far_ood_tasks])
