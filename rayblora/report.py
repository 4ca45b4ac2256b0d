"""Evaluation report: metrics tables (JSON / Markdown) and diagnostic plots.

Input is ``results[method][split] -> SplitResult``. The report dict has the
exact layout::

    {"methods": {METHOD: {SPLIT: {accuracy, nll, ece, ece_em, brier, auroc, aurc, acc_at_90, reject10,
                                  [sd: {...}, members: K]  (a row of members predicting alone: map)
                                  [member_disagreement]}}},   (an ensemble row)
     "ood":     {METHOD: {SHIFT_OR_FAR_OOD_SPLIT: {"auroc_entropy", "auroc_mi", ["auroc_density"]}}},
     "meta":    meta, "far_ood": [FAR_OOD_SPLIT, ...]}

Per-split uncertainty metrics (auroc, aurc, acc_at_90, reject10) use total predictive
entropy. OOD AUROCs treat the shifted split as the positive class; "auroc_density" (the feature density's
Mahalanobis distance, :mod:`rayblora.density`) where the posterior carries one, and then a density histogram
(density.png) beside the other plots.
Plots are drawn with matplotlib's Agg canvas (no pyplot global state).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rayblora.metrics import (
    classification_metrics,
    ood_auroc,
    reliability_bins,
    risk_coverage_curve,
)

__all__ = ["SplitResult", "build_report", "render_markdown", "write_report"]

METRIC_COLUMNS = (
    ("accuracy", "ACC"),
    ("nll", "NLL"),
    ("ece", "ECE"),
    ("ece_em", "ECE-EM"),
    ("brier", "Brier"),
    ("auroc", "AUROC"),
    ("aurc", "AURC"),
    ("acc_at_90", "ACC@90"),
    ("reject10", "Rej10"),
)


@dataclass
class SplitResult:
    """Predictions of one method on one split.

    probs: (N, C) predictive probabilities (rows sum to 1).
    labels: (N,) integer class labels.
    entropy: (N,) total predictive entropy.
    mutual_information: (N,) epistemic part (mutual information).
    member_probs: (K, N, C) or None. Given for a row that stands for K members each predicting alone (`map`):
        its metrics are the mean over the members, with their standard deviation under "sd" (the plots draw
        `probs`, member 0).
    extra: further scalar metrics of the row (e.g. the ensemble's member disagreement).
    distance: (N,) feature-density distance (:mod:`rayblora.density`), or None where the posterior has none.
    """

    probs: np.ndarray
    labels: np.ndarray
    entropy: np.ndarray
    mutual_information: np.ndarray
    member_probs: np.ndarray | None = None
    extra: dict | None = None
    distance: np.ndarray | None = None

    def __post_init__(self) -> None:
        """Coerce fields to numpy arrays and check that their lengths agree."""
        self.probs = np.asarray(self.probs)
        self.labels = np.asarray(self.labels)
        self.entropy = np.asarray(self.entropy, dtype=float)
        self.mutual_information = np.asarray(self.mutual_information, dtype=float)
        if self.probs.ndim != 2:
            raise ValueError(f"probs must be 2-D (N, C), got shape {self.probs.shape}")
        n = self.probs.shape[0]
        if self.distance is not None:
            self.distance = np.asarray(self.distance, dtype=float)
        for name in ("labels", "entropy", "mutual_information") + (("distance",) if self.distance is not None else ()):
            shape = getattr(self, name).shape
            if shape != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {shape}")
        if self.member_probs is not None:
            self.member_probs = np.asarray(self.member_probs)
            if self.member_probs.ndim != 3 or self.member_probs.shape[1:] != self.probs.shape:
                raise ValueError(f"member_probs must be (K, {n}, {self.probs.shape[1]}), got "
                                 f"{self.member_probs.shape}")


# --------------------------------------------------------------------------- #
# report dict
# --------------------------------------------------------------------------- #
def _check_results(results, in_domain: str) -> None:
    """Raise ``ValueError`` unless ``results`` is a non-empty nested dict of SplitResult."""
    if not isinstance(results, dict) or not results:
        raise ValueError("results must be a non-empty dict {method: {split: SplitResult}}")
    for method, splits in results.items():
        if not isinstance(splits, dict) or not splits:
            raise ValueError(f"results[{method!r}] must be a non-empty dict of splits")
        if in_domain not in splits:
            raise ValueError(f"in_domain split {in_domain!r} missing for method {method!r}")
        for split, res in splits.items():
            if not isinstance(res, SplitResult):
                raise ValueError(f"results[{method!r}][{split!r}] is not a SplitResult")


def _entropy(probs: np.ndarray) -> np.ndarray:
    return -(probs * np.log(np.clip(probs, 1e-30, None))).sum(-1)


def split_metrics(result: SplitResult, n_bins: int = 15) -> dict:
    """Metrics of one row on one split; for a member row (`member_probs`), the mean over members and "sd"."""
    if result.member_probs is None:
        out = classification_metrics(result.probs, result.labels, result.entropy, n_bins=n_bins)
    else:
        each = [classification_metrics(p, result.labels, _entropy(p), n_bins=n_bins) for p in result.member_probs]
        out = {k: float(np.mean([m[k] for m in each])) for k in each[0]}
        out["sd"] = {k: float(np.std([m[k] for m in each], ddof=1)) if len(each) > 1 else 0.0 for k in each[0]}
        out["members"] = len(each)
    return {**out, **(result.extra or {})}


def build_report(results: dict, in_domain: str, meta: dict, n_bins: int = 15, far_ood=()) -> dict:
    """Compute per-split metrics and in-domain-vs-shift OOD AUROCs.

    Splits named in `far_ood` are unlabelled far-OOD text: they get OOD AUROCs only, no metrics row.
    NaN values (e.g. error AUROC when every prediction is correct) are kept
    as float NaN here; ``write_report`` stores them as JSON ``null``.
    """
    _check_results(results, in_domain)
    methods, ood = {}, {}
    for method, splits in results.items():
        methods[method] = {split: split_metrics(r, n_bins) for split, r in splits.items() if split not in far_ood}
        ref = splits[in_domain]
        ood[method] = {split: ood_scores(ref, r) for split, r in splits.items() if split != in_domain}
    return {"methods": methods, "ood": ood, "meta": dict(meta or {}), "far_ood": list(far_ood)}


def ood_scores(reference: SplitResult, shifted: SplitResult) -> dict:
    """OOD AUROCs of `shifted` (positive) against `reference` by entropy, MI and, where both carry one, the
    feature density's distance."""
    out = {"auroc_entropy": ood_auroc(reference.entropy, shifted.entropy),
           "auroc_mi": ood_auroc(reference.mutual_information, shifted.mutual_information)}
    if reference.distance is not None and shifted.distance is not None:
        out["auroc_density"] = ood_auroc(reference.distance, shifted.distance)
    return out


# --------------------------------------------------------------------------- #
# markdown
# --------------------------------------------------------------------------- #
def _fmt(value, sd=None) -> str:
    """4-decimal number (± sd when given), or ``n/a`` for None / NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if sd is None or (isinstance(sd, float) and math.isnan(sd)):
        return f"{float(value):.4f}"
    return f"{float(value):.4f} ± {float(sd):.4f}"


def _cell(text) -> str:
    """Escape a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list, aligns: list, rows: list) -> list:
    """Markdown table lines from a header (list of str) and rows (lists of str)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(aligns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def render_markdown(report: dict) -> str:
    """Render a report dict (as returned by ``build_report``) to Markdown."""
    lines = ["# Bayesian LoRA evaluation report", ""]
    for key, value in report.get("meta", {}).items():
        lines.append(f"- **{_cell(key)}**: {_cell(value)}")
    lines += ["", "## Classification, calibration and selective prediction", ""]
    lines.append("Uncertainty for AUROC / AURC / ACC@90 / Rej10 is total predictive entropy; a row of K "
                 "members each predicting alone (map) shows their mean ± sd.")
    lines.append("")
    header = ["Method", "Split"] + [label for _, label in METRIC_COLUMNS]
    rows = [
        [_cell(method), _cell(split)] + [_fmt(m.get(key), m.get("sd", {}).get(key)) for key, _ in METRIC_COLUMNS]
        for method, splits in report["methods"].items()
        for split, m in splits.items()
    ]
    lines += _table(header, ["---", "---"] + ["---:"] * len(METRIC_COLUMNS), rows)
    lines += ["", "## OOD detection (shift split = positive class)", ""]
    rows = [
        [_cell(method), _cell(split), _fmt(v["auroc_entropy"]), _fmt(v["auroc_mi"]), _fmt(v.get("auroc_density"))]
        for method, splits in report["ood"].items()
        for split, v in splits.items()
    ]
    if rows:
        header = ["Method", "Shift split", "AUROC (entropy)", "AUROC (MI)", "AUROC (density)"]
        lines += _table(header, ["---", "---", "---:", "---:", "---:"], rows)
    else:
        lines.append("_No shift splits._")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- #
# plots
# --------------------------------------------------------------------------- #
def _split_order(results: dict) -> list:
    """All split names, in order of first appearance across methods."""
    order = []
    for splits in results.values():
        order += [s for s in splits if s not in order]
    return order


def _panel_figure(n_panels: int):
    """Agg-backed figure with ``n_panels`` square panels in one row."""
    fig = Figure(figsize=(4.2 * n_panels, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, n_panels, squeeze=False)[0]


def _reliability_figure(results: dict, in_domain: str, n_bins: int) -> Figure:
    """One reliability diagram per split, a line per method, plus the diagonal."""
    splits = _split_order(results)
    fig, axes = _panel_figure(len(splits))
    for ax, split in zip(axes, splits):
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        for method, per_split in results.items():
            if split not in per_split:
                continue
            r = per_split[split]
            bins = reliability_bins(r.probs, r.labels, n_bins)
            mask = bins["counts"] > 0
            ax.plot(bins["confidence"][mask], bins["accuracy"][mask], marker="o", ms=4,
                    label=method)
        tag = " (in-domain)" if split == in_domain else ""
        ax.set(title=f"{split}{tag}", xlabel="confidence", ylabel="accuracy",
               xlim=(0, 1), ylim=(0, 1.02), aspect="equal")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    return fig


def _coverage_figure(results: dict, in_domain: str) -> Figure:
    """Accuracy vs coverage (entropy-ranked) per split, a line per method."""
    splits = _split_order(results)
    fig, axes = _panel_figure(len(splits))
    for ax, split in zip(axes, splits):
        for method, per_split in results.items():
            if split not in per_split:
                continue
            r = per_split[split]
            cov, acc = risk_coverage_curve(r.probs, r.labels, r.entropy)
            ax.plot(cov, acc, lw=1.5, label=method)
        tag = " (in-domain)" if split == in_domain else ""
        ax.set(title=f"{split}{tag}", xlabel="coverage", ylabel="accuracy",
               xlim=(0, 1), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    return fig


def _density_figure(results: dict, in_domain: str) -> Figure | None:
    """Histograms of the feature-density distance per split (in-domain, shifts, far-OOD), one panel per method
    that carries one, with its in-distribution threshold where known; None when no method does."""
    methods = [m for m, splits in results.items() if splits[in_domain].distance is not None]
    if not methods:
        return None
    fig, axes = _panel_figure(len(methods))
    for ax, method in zip(axes, methods):
        splits = results[method]
        values = np.concatenate([r.distance for r in splits.values() if r.distance is not None])
        bins = np.linspace(values.min(), np.quantile(values, 0.995), 40)
        for split, r in splits.items():
            if r.distance is not None:
                ax.hist(np.clip(r.distance, None, bins[-1]), bins=bins, histtype="step", density=True,
                        lw=1.8 if split == in_domain else 1.2, label=split)
        threshold = (splits[in_domain].extra or {}).get("density_threshold")
        if threshold is not None:
            ax.axvline(threshold, color="k", ls="--", lw=1, label="in-distribution threshold")
        ax.set(title=f"{method}: feature distance", xlabel="Mahalanobis distance", ylabel="density")
        ax.legend(fontsize=8)
    return fig


def write_coverage_png(path, results: dict, in_domain: str) -> None:
    """Write the accuracy-vs-coverage figure of ``results[method][split]`` (SplitResult) to ``path``."""
    fig = _coverage_figure(results, in_domain)
    _atomic_write(os.fspath(path), lambda f: fig.savefig(f, format="png", dpi=110))


# --------------------------------------------------------------------------- #
# writing
# --------------------------------------------------------------------------- #
def to_jsonable(obj):
    """Recursively convert numpy types to python and NaN/inf floats to None."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _atomic_write(path: str, write_fn) -> None:
    """Call ``write_fn(binary_file)`` on a temp file in the same dir, then os.replace."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write_fn(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_report(out_dir, results: dict, in_domain: str, meta: dict,
                 n_bins: int = 15, far_ood=()) -> dict:
    """Write report.json, report.md, reliability.png, coverage.png (and density.png) atomically.

    Returns the report dict from ``build_report`` (NaN kept as float NaN; the
    JSON file stores them as null and is strict JSON).
    """
    report = build_report(results, in_domain, meta, n_bins=n_bins, far_ood=far_ood)
    all_results = results
    results = {m: {s: r for s, r in splits.items() if s not in far_ood} for m, splits in results.items()}
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    text = json.dumps(to_jsonable(report), indent=2, allow_nan=False) + "\n"
    _atomic_write(os.path.join(out_dir, "report.json"), lambda f: f.write(text.encode()))
    md = render_markdown(report).encode()
    _atomic_write(os.path.join(out_dir, "report.md"), lambda f: f.write(md))
    figures = {
        "reliability.png": _reliability_figure(results, in_domain, n_bins),
        "coverage.png": _coverage_figure(results, in_domain),
    }
    histogram = _density_figure(all_results, in_domain)
    if histogram is not None:
        figures["density.png"] = histogram
    for name, fig in figures.items():
        _atomic_write(os.path.join(out_dir, name),
                      lambda f, fig=fig: fig.savefig(f, format="png", dpi=110))
    return report
