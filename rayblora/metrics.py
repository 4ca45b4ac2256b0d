"""Classification, calibration and uncertainty metrics (numpy only).

Conventions used throughout:

* ``probs``: ``(N, C)`` float array, each row a probability vector summing to 1.
* ``labels``: ``(N,)`` integer array with values in ``[0, C)``.
* ``uncertainty``: ``(N,)`` float array, higher means *more* uncertain.
* ``errors``: ``(N,)`` bool / 0-1 array, ``True`` where the prediction is wrong.

Every public function validates its inputs and raises ``ValueError`` with a
message naming the offending argument.
"""

from __future__ import annotations

import math

import numpy as np

PROB_SUM_TOL = 1e-4

__all__ = [
    "accuracy",
    "nll",
    "ece",
    "brier",
    "error_auroc",
    "aurc",
    "accuracy_at_coverage",
    "ood_auroc",
    "reliability_bins",
    "risk_coverage_curve",
    "classification_metrics",
]


# --------------------------------------------------------------------------- #
# validation helpers
# --------------------------------------------------------------------------- #
def _check_probs(probs) -> np.ndarray:
    """Return ``probs`` as a float ``(N, C)`` array or raise ``ValueError``."""
    p = np.asarray(probs, dtype=float)
    if p.ndim != 2:
        raise ValueError(f"probs must be 2-D (N, C), got shape {p.shape}")
    if p.shape[0] == 0 or p.shape[1] == 0:
        raise ValueError(f"probs must be non-empty, got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contains non-finite values")
    if np.any(p < 0):
        raise ValueError("probs contains negative values")
    sums = p.sum(axis=1)
    if np.any(np.abs(sums - 1.0) > PROB_SUM_TOL):
        worst = float(sums[np.argmax(np.abs(sums - 1.0))])
        raise ValueError(
            f"probs rows must sum to 1 (tol {PROB_SUM_TOL}); found a row summing to {worst}"
        )
    return p


def _check_labels(labels, n: int, n_classes: int) -> np.ndarray:
    """Return ``labels`` as an int ``(N,)`` array in ``[0, n_classes)``."""
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D (N,), got shape {y.shape}")
    if y.shape[0] != n:
        raise ValueError(f"labels has length {y.shape[0]} but probs has {n} rows")
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_)):
        yf = y.astype(float)
        if not np.all(np.isfinite(yf)) or np.any(yf != np.round(yf)):
            raise ValueError("labels must be integers")
    y = y.astype(np.int64)
    if np.any(y < 0) or np.any(y >= n_classes):
        raise ValueError(
            f"labels out of range: expected values in [0, {n_classes}), "
            f"got min {int(y.min())} max {int(y.max())}"
        )
    return y


def _check_vector(x, name: str, n: int | None = None) -> np.ndarray:
    """Return ``x`` as a finite, non-empty float ``(N,)`` array."""
    v = np.asarray(x, dtype=float)
    if v.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {v.shape}")
    if v.shape[0] == 0:
        raise ValueError(f"{name} must be non-empty")
    if n is not None and v.shape[0] != n:
        raise ValueError(f"{name} has length {v.shape[0]}, expected {n}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} contains non-finite values")
    return v


def _check_errors(errors, n: int) -> np.ndarray:
    """Return ``errors`` as a bool ``(N,)`` array (values must be 0/1)."""
    e = _check_vector(errors, "errors", n)
    if np.any((e != 0) & (e != 1)):
        raise ValueError("errors must be boolean or contain only 0/1")
    return e.astype(bool)


def _check_n_bins(n_bins) -> int:
    """Return ``n_bins`` as a positive int or raise ``ValueError``."""
    ok = isinstance(n_bins, (int, np.integer)) and not isinstance(n_bins, bool)
    if not ok or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    return int(n_bins)


def _check_inputs(probs, labels, uncertainty=None):
    """Validate the standard ``(probs, labels[, uncertainty])`` triple."""
    p = _check_probs(probs)
    y = _check_labels(labels, p.shape[0], p.shape[1])
    if uncertainty is None:
        return p, y
    u = _check_vector(uncertainty, "uncertainty", p.shape[0])
    return p, y, u


# --------------------------------------------------------------------------- #
# internals
# --------------------------------------------------------------------------- #
def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` (N,), ties receive the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # start index of each run of equal values
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.shape[0]]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks_sorted = np.repeat(avg, ends - starts)
    ranks = np.empty_like(ranks_sorted)
    ranks[order] = ranks_sorted
    return ranks


def _auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney AUROC of ``scores`` (N,) for bool ``positive`` (N,)."""
    n_pos = int(positive.sum())
    n_neg = positive.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    u_stat = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u_stat / (n_pos * n_neg))


def _bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin id in ``[0, n_bins)`` for confidences (N,); bins are ``(lo, hi]``."""
    inner = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    return np.digitize(conf, inner, right=True)


def _certain_first(uncertainty: np.ndarray) -> np.ndarray:
    """Stable permutation (N,) sorting by increasing uncertainty."""
    return np.argsort(uncertainty, kind="stable")


# --------------------------------------------------------------------------- #
# public metrics
# --------------------------------------------------------------------------- #
def accuracy(probs, labels) -> float:
    """Top-1 accuracy. ``probs`` (N, C), ``labels`` (N,)."""
    p, y = _check_inputs(probs, labels)
    return float(np.mean(p.argmax(axis=1) == y))


def nll(probs, labels, eps: float = 1e-12) -> float:
    """Mean negative log-probability of the true class; probs clipped at ``eps``."""
    p, y = _check_inputs(probs, labels)
    true_p = p[np.arange(p.shape[0]), y]
    return float(-np.mean(np.log(np.maximum(true_p, eps))))


def reliability_bins(probs, labels, n_bins: int = 15) -> dict:
    """Per-bin statistics of max-prob confidence on equal-width ``(lo, hi]`` bins.

    Returns a dict of ``(n_bins,)`` arrays: ``centers``, ``accuracy``,
    ``confidence`` (NaN for empty bins) and ``counts`` (int).
    """
    p, y = _check_inputs(probs, labels)
    n_bins = _check_n_bins(n_bins)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(float)
    idx = _bin_index(conf, n_bins)
    counts = np.bincount(idx, minlength=n_bins)
    sum_acc = np.bincount(idx, weights=correct, minlength=n_bins)
    sum_conf = np.bincount(idx, weights=conf, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(counts > 0, sum_acc / counts, np.nan)
        mean_conf = np.where(counts > 0, sum_conf / counts, np.nan)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return {
        "centers": (edges[:-1] + edges[1:]) / 2.0,
        "accuracy": acc,
        "confidence": mean_conf,
        "counts": counts.astype(np.int64),
    }


def ece(probs, labels, n_bins: int = 15) -> float:
    """Expected calibration error: sum_b (n_b / N) * |acc_b - conf_b|."""
    bins = reliability_bins(probs, labels, n_bins)
    counts = bins["counts"]
    mask = counts > 0
    gaps = np.abs(bins["accuracy"][mask] - bins["confidence"][mask])
    return float(np.sum(counts[mask] * gaps) / counts.sum())


def ece_equal_mass(probs, labels, n_bins: int = 15) -> float:
    """ECE over `n_bins` bins of (nearly) equal count, sorted by confidence (less biased at small N than
    equal-width bins; Nixon et al. 2019, "adaptive calibration error"): sum_b (n_b / N) |acc_b - conf_b|."""
    p, y = _check_inputs(probs, labels)
    n_bins = _check_n_bins(n_bins)
    conf = p.max(axis=1)
    order = np.argsort(conf, kind="stable")
    correct = (p.argmax(axis=1) == y).astype(float)[order]
    gaps = [abs(correct[b].mean() - conf[order][b].mean()) * b.size
            for b in np.array_split(np.arange(conf.size), min(n_bins, conf.size)) if b.size]
    return float(np.sum(gaps) / conf.size)


def rejection_error_reduction(probs, labels, uncertainty, fraction: float = 0.1) -> float:
    """Relative error reduction (err_all - err_kept) / err_all when the `fraction` most uncertain examples are
    rejected (stable sort; NaN when there is no error to reduce)."""
    p, y, u = _check_inputs(probs, labels, uncertainty)
    if not 0.0 <= float(fraction) < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction!r}")
    errors = (p.argmax(axis=1) != y).astype(float)
    keep = _certain_first(u)[:max(1, math.ceil((1.0 - fraction) * errors.size - 1e-9))]
    if errors.mean() == 0:
        return float("nan")
    return float((errors.mean() - errors[keep].mean()) / errors.mean())


def brier(probs, labels) -> float:
    """Mean over examples of sum_c (p_c - onehot_c)^2; ``probs`` (N, C)."""
    p, y = _check_inputs(probs, labels)
    onehot = np.zeros_like(p)
    onehot[np.arange(p.shape[0]), y] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def error_auroc(uncertainty, errors) -> float:
    """AUROC of ranking errors above correct predictions by uncertainty.

    ``uncertainty`` (N,), ``errors`` (N,) bool. Ties count 1/2. Returns NaN
    when all predictions are correct or all are wrong.
    """
    u = _check_vector(uncertainty, "uncertainty")
    e = _check_errors(errors, u.shape[0])
    return _auroc(u, e)


def aurc(uncertainty, errors) -> float:
    """Area under the risk-coverage curve.

    Examples are sorted by increasing ``uncertainty`` (N,) (stable); the risk at
    coverage k/N is the error rate of the k most certain examples; the result
    is the mean risk over k = 1..N.
    """
    u = _check_vector(uncertainty, "uncertainty")
    e = _check_errors(errors, u.shape[0])
    e_sorted = e[_certain_first(u)].astype(float)
    k = np.arange(1, e_sorted.shape[0] + 1)
    return float(np.mean(np.cumsum(e_sorted) / k))


def prediction_rejection_ratio(uncertainty, quality) -> float:
    """Prediction-rejection ratio (Malinin & Gales, arXiv 2002.07650; as LM-Polygraph reports it).

    Rejecting the k most uncertain of N predictions (k = 0..N−1) leaves a mean `quality` (N,) (e.g. exact
    match 0/1); PRR = (A_unc − A_random) / (A_oracle − A_random) of the areas under that curve, with the oracle
    rejecting the lowest quality first and random rejection keeping the mean. 1 = oracle, 0 = random; NaN when
    every prediction has the same quality.
    """
    u = _check_vector(uncertainty, "uncertainty")
    q = _check_vector(quality, "quality", u.shape[0]).astype(float)

    def area(order: np.ndarray) -> float:
        kept = q[order]  # most certain first: rejecting k drops the last k
        return float(np.mean(np.cumsum(kept)[::-1] / np.arange(len(kept), 0, -1)))

    oracle, random = area(np.argsort(-q, kind="stable")), float(q.mean())
    if oracle - random <= 0:
        return float("nan")
    return (area(_certain_first(u)) - random) / (oracle - random)


def risk_coverage_curve(probs, labels, uncertainty):
    """Accuracy of the k most certain examples for k = 1..N.

    Returns ``(coverage, accuracy)``, both ``(N,)`` arrays; coverage = k/N.
    """
    p, y, u = _check_inputs(probs, labels, uncertainty)
    correct = (p.argmax(axis=1) == y)[_certain_first(u)].astype(float)
    n = correct.shape[0]
    k = np.arange(1, n + 1)
    return k / n, np.cumsum(correct) / k


def accuracy_at_coverage(probs, labels, uncertainty, coverage: float = 0.9) -> float:
    """Accuracy on the ceil(coverage * N) least-uncertain examples (stable sort).

    ``probs`` (N, C), ``labels`` (N,), ``uncertainty`` (N,); coverage in (0, 1].
    """
    p, y, u = _check_inputs(probs, labels, uncertainty)
    if not (0.0 < float(coverage) <= 1.0):
        raise ValueError(f"coverage must be in (0, 1], got {coverage!r}")
    n = p.shape[0]
    # small slack so that e.g. 0.7 * 10 = 7.000000000000001 keeps 7, not 8
    k = min(n, max(1, math.ceil(coverage * n - 1e-9)))
    keep = _certain_first(u)[:k]
    return float(np.mean(p[keep].argmax(axis=1) == y[keep]))


def ood_auroc(uncertainty_in, uncertainty_out) -> float:
    """AUROC for detecting OOD (positive) examples by higher uncertainty.

    ``uncertainty_in`` (N_in,), ``uncertainty_out`` (N_out,); ties count 1/2.
    """
    u_in = _check_vector(uncertainty_in, "uncertainty_in")
    u_out = _check_vector(uncertainty_out, "uncertainty_out")
    scores = np.concatenate([u_in, u_out])
    positive = np.r_[np.zeros(u_in.shape[0], bool), np.ones(u_out.shape[0], bool)]
    return _auroc(scores, positive)


def classification_metrics(probs, labels, uncertainty, n_bins: int = 15) -> dict:
    """All scalar metrics for one split, as plain python floats.

    Keys: accuracy, nll, ece, ece_em (equal-mass ECE), brier, auroc (error AUROC), aurc, acc_at_90,
    reject10 (relative error reduction when the 10 % most uncertain are rejected).
    """
    p, y, u = _check_inputs(probs, labels, uncertainty)
    errors = p.argmax(axis=1) != y
    return {
        "accuracy": accuracy(p, y),
        "nll": nll(p, y),
        "ece": ece(p, y, n_bins),
        "ece_em": ece_equal_mass(p, y, n_bins),
        "brier": brier(p, y),
        "auroc": error_auroc(u, errors),
        "aurc": aurc(u, errors),
        "acc_at_90": accuracy_at_coverage(p, y, u, 0.9),
        "reject10": rejection_error_reduction(p, y, u, 0.1),
    }
