"""Comparing methods over seeds: paired-bootstrap intervals of (method − reference) and a forest plot.

A benchmark evaluates every method on the same test rows of each seed (`results[method][split]`, one
:class:`~rayblora.report.SplitResult` per seed). For a metric M the difference of a method to the reference
(`map`) is averaged over seeds, Δ = 1/S Σ_s [M(method_s) − M(map_s)], and its 95 % interval comes from a
paired bootstrap: each replicate redraws, independently per seed, N_s test rows with replacement and evaluates
*both* methods on those same rows (Efron & Tibshirani 1993, ch. 16), so the row-to-row difficulty that the two
methods share cancels. A member row (`SplitResult.member_probs`: `map`, K members each predicting alone) is the
mean of its members' metrics on the drawn rows.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rayblora import metrics
from rayblora.report import SplitResult

METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": metrics.accuracy, "nll": metrics.nll, "ece": metrics.ece}
"""The metrics a comparison reports intervals for (probs (N, C), labels (N,)) -> float."""


def row_metric(result: SplitResult, metric: str, rows: np.ndarray | None = None) -> float:
    """`metric` of one row on the test rows `rows` (indices; None = all); member rows: the members' mean."""
    fn = METRICS[metric]
    labels = result.labels if rows is None else result.labels[rows]
    if result.member_probs is None:
        return fn(result.probs if rows is None else result.probs[rows], labels)
    return float(np.mean([fn(p if rows is None else p[rows], labels) for p in result.member_probs]))


def _check_paired(per_seed: dict[str, Sequence[SplitResult]], reference: str) -> int:
    if reference not in per_seed:
        raise ValueError(f"reference method {reference!r} has no results (methods: {sorted(per_seed)})")
    seeds = {len(rows) for rows in per_seed.values()}
    if len(seeds) != 1:
        raise ValueError(f"every method needs one result per seed; got {sorted(seeds)} seeds")
    for s, ref in enumerate(per_seed[reference]):
        for method, rows in per_seed.items():
            if not np.array_equal(rows[s].labels, ref.labels):
                raise ValueError(f"{method}, seed {s}: not evaluated on the reference's test rows (labels differ)")
    return seeds.pop()


def paired_bootstrap(per_seed: dict[str, Sequence[SplitResult]], reference: str = "map",
                     metric_names: Sequence[str] = tuple(METRICS), n_boot: int = 1000, seed: int = 0,
                     ) -> dict[str, dict[str, dict[str, float]]]:
    """Seed-averaged Δ = method − `reference` with its 95 % paired-bootstrap interval, for every method and
    metric of one split: out[method][metric] = {"delta", "lo", "hi"}. `per_seed[method]` holds one SplitResult
    per seed, every method of a seed on the same rows."""
    n_seeds = _check_paired(per_seed, reference)
    rng = np.random.default_rng(seed)
    draws = {m: {k: np.zeros(n_boot) for k in metric_names} for m in per_seed}
    for s in range(n_seeds):
        n = len(per_seed[reference][s].labels)
        for b in range(n_boot):
            rows = rng.integers(0, n, n)
            for k in metric_names:
                ref = row_metric(per_seed[reference][s], k, rows)
                for m, results in per_seed.items():
                    if m != reference:  # the reference's own differences are 0
                        draws[m][k][b] += (row_metric(results[s], k, rows) - ref) / n_seeds
    out = {}
    for m, results in per_seed.items():
        out[m] = {}
        for k in metric_names:
            delta = float(np.mean([row_metric(results[s], k) - row_metric(per_seed[reference][s], k)
                                   for s in range(n_seeds)]))
            lo, hi = np.percentile(draws[m][k], [2.5, 97.5])
            out[m][k] = {"delta": delta, "lo": float(lo), "hi": float(hi)}
    return out


def forest_figure(deltas: dict[str, dict[str, dict[str, dict[str, float]]]], metric_names: Sequence[str],
                  reference: str = "map") -> Figure:
    """Forest plot: one panel per (metric, split), a row per method with Δ and its interval, a line at 0.
    `deltas[split][method][metric]` as returned by :func:`paired_bootstrap` per split."""
    splits = list(deltas)
    fig = Figure(figsize=(3.6 * len(splits), 0.4 * max(len(v) for v in deltas.values()) * len(metric_names) + 1.5),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(metric_names), len(splits), squeeze=False)
    for i, metric in enumerate(metric_names):
        for j, split in enumerate(splits):
            methods = [m for m in deltas[split] if m != reference]
            ax = axes[i][j]
            for y, m in enumerate(methods):
                d = deltas[split][m][metric]
                ax.errorbar([d["delta"]], [y], xerr=[[d["delta"] - d["lo"]], [d["hi"] - d["delta"]]], fmt="o",
                            color="C3" if d["hi"] < 0 or d["lo"] > 0 else "C0", capsize=3)
            ax.axvline(0.0, color="k", lw=1)
            ax.set_yticks(range(len(methods)), methods if j == 0 else [""] * len(methods))
            ax.invert_yaxis()
            ax.set(title=f"{split}: Δ {metric} vs {reference}")
            ax.grid(alpha=0.3, axis="x")
    return fig


def reliability_grid(pooled: dict[str, SplitResult], n_bins: int = 15) -> Figure:
    """Reliability diagram per method (`pooled[method]`: e.g. every seed's in-domain rows joined)."""
    names = list(pooled)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(3.4 * cols, 3.4 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
    for ax, name in zip(axes, names):
        bins = metrics.reliability_bins(pooled[name].probs, pooled[name].labels, n_bins)
        filled = bins["counts"] > 0
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.bar(bins["centers"][filled], bins["accuracy"][filled], width=1.0 / n_bins, alpha=0.6, edgecolor="k")
        ece = metrics.ece(pooled[name].probs, pooled[name].labels, n_bins)
        ax.set(title=f"{name} (ECE {ece:.3f})", xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    for ax in axes[len(names):]:
        ax.set_axis_off()
    return fig


def join(results: Sequence[SplitResult]) -> SplitResult:
    """One SplitResult of several seeds' rows (member rows keep their members when every seed has K)."""
    members = [r.member_probs for r in results]
    joined = (np.concatenate(members, axis=1)
              if all(m is not None for m in members) and len({m.shape[0] for m in members}) == 1 else None)
    return SplitResult(np.concatenate([r.probs for r in results]), np.concatenate([r.labels for r in results]),
                       np.concatenate([r.entropy for r in results]),
                       np.concatenate([r.mutual_information for r in results]), member_probs=joined)
