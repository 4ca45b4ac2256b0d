"""How well a posterior's answer-level uncertainty predicts whether a generated answer is right.

For N prompts with exact-match targets, a method's answers are graded 0/1 (:func:`rayblora.generation.answers.
exact_match`) and each of its sequence scores is judged as a detector of wrong answers: AUROC (wrong above right),
AURC (area under the risk-coverage curve) and the prediction-rejection ratio (:mod:`rayblora.metrics`), as
LM-Polygraph reports them (Fadeeva et al., arXiv 2311.07383). Differences between two methods come with a
paired bootstrap over prompts, stratified by seed (:func:`paired_difference`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from rayblora import metrics
from rayblora.generation.answers import exact_match
from rayblora.generation.decode import Generation

LOWER_IS_CERTAIN = ("mean_token_mi", "max_token_mi", "mean_token_entropy", "max_token_entropy",
                    "mean_token_aleatoric", "sequence_nll", "mean_token_nll", "group_entropy", "num_groups",
                    "mean_state_nll", "feature_distance")
"""Sequence scores that grow with uncertainty; `modal_share` shrinks with it (its uncertainty is 1 − share)."""


def uncertainty_scores(answers: Sequence[Generation]) -> dict[str, np.ndarray]:
    """Every sequence score the answers carry (the prompts' "feature_distance" too, where the posterior has a
    feature density), as uncertainties (N,) (higher = less certain)."""
    names = sorted(set.intersection(*(set(a.scores) for a in answers))) if answers else []
    out = {}
    for name in names:
        values = np.array([a.scores[name] for a in answers], dtype=float)
        out[name] = 1.0 - values if name == "modal_share" else values
    return out


def correctness(answers: Sequence[Generation], targets: Sequence[str | Sequence[str]]) -> np.ndarray:
    """Exact match of each answer's text with its target(s) (N,) bool."""
    if len(answers) != len(targets):
        raise ValueError(f"{len(answers)} answers but {len(targets)} targets")
    return np.array([exact_match(a.text, t) for a, t in zip(answers, targets)], dtype=bool)


def detection_metrics(uncertainty: np.ndarray, correct: np.ndarray) -> dict[str, float]:
    """AUROC of wrong vs right, AURC and PRR of one uncertainty score."""
    return {"auroc": metrics.error_auroc(uncertainty, ~correct), "aurc": metrics.aurc(uncertainty, ~correct),
            "prr": metrics.prediction_rejection_ratio(uncertainty, correct.astype(float))}


def summarise(correct: np.ndarray, scores: dict[str, np.ndarray]) -> dict:
    """{"n", "exact_match", "scores": {score: detection metrics}} of one method's graded answers (N,) and its
    uncertainty scores {name: (N,)}."""
    return {"n": int(len(correct)), "exact_match": float(correct.mean()),
            "scores": {name: detection_metrics(u, correct) for name, u in scores.items()}}


def evaluate_answers(answers: Sequence[Generation], targets: Sequence[str | Sequence[str]],
                     extra_scores: dict[str, np.ndarray] | None = None) -> dict:
    """:func:`summarise` of one method's answers; `extra_scores` (e.g. the group entropy of the same
    posterior's per-state answers) are judged against these answers too."""
    return summarise(correctness(answers, targets), {**uncertainty_scores(answers), **(extra_scores or {})})


Scored = tuple[np.ndarray, np.ndarray]
"""(uncertainty (N,), correct (N,)) of one method's answers."""


STATISTICS = {"auroc": lambda u, c: metrics.error_auroc(u, ~c), "exact_match": lambda u, c: float(c.mean())}
"""Per-method statistics a paired difference can compare: AUROC of wrong vs right by the uncertainty, and
exact match (the uncertainty unused)."""


def _mean_statistic(entry: Scored | Sequence[Scored], rows, statistic) -> float:
    """The statistic of one scored method, or its mean over several (e.g. each member alone)."""
    group = [entry] if isinstance(entry, tuple) else entry
    return float(np.mean([statistic(u[rows], c[rows]) for u, c in group]))


def paired_difference(a: Sequence[Scored | Sequence[Scored]], b: Sequence[Scored | Sequence[Scored]],
                      statistic: str = "auroc", resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """statistic(a) − statistic(b) (:data:`STATISTICS`) averaged over seeds, with a 95 % paired-bootstrap interval.

    a, b: per seed, the (uncertainty (N,), correct (N,)) of a method on that seed's N prompts, or a list of
    them whose statistics are averaged (e.g. the K members each alone: the expected single adapter). Each
    resample draws the prompts of every seed with replacement (the same draw for both sides) and averages the
    seeds' differences. Returns {"delta", "low", "high", "resamples"}."""
    if len(a) != len(b) or not a:
        raise ValueError("paired_difference needs the same, non-zero number of seeds for both methods")
    stat, rng = STATISTICS[statistic], np.random.default_rng(seed)
    sizes = [len((x if isinstance(x, tuple) else x[0])[0]) for x in a]

    def delta(rows: Sequence[np.ndarray | slice]) -> float:
        return float(np.mean([_mean_statistic(x, r, stat) - _mean_statistic(y, r, stat)
                              for x, y, r in zip(a, b, rows)]))

    point = delta([slice(None)] * len(a))
    draws = [delta([rng.integers(0, n, n) for n in sizes]) for _ in range(resamples)]
    draws = [d for d in draws if np.isfinite(d)]
    low, high = np.percentile(draws, [2.5, 97.5]) if draws else (float("nan"), float("nan"))
    return {"delta": point, "low": float(low), "high": float(high), "resamples": len(draws)}
