"""Paired-bootstrap comparison over seeds: exact zero for identical rows, intervals that exclude zero for a
uniformly better method and cover zero for an exchangeable one, member rows, and mismatched rows refused."""

from __future__ import annotations

import numpy as np
import pytest

from rayblora.comparison import forest_figure, join, paired_bootstrap, reliability_grid, row_metric
from rayblora.metrics import nll
from rayblora.report import SplitResult


def _row(probs, labels, members=None):
    ent = -(probs * np.log(probs)).sum(-1)
    return SplitResult(probs, labels, ent, np.zeros(len(labels)), member_probs=members)


def _seeds(n_seeds=3, n=400):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n_seeds):  # calibrated log-odds z, labels drawn from them, probabilities 4x over-confident
        z = rng.normal(0, 2.0, n)
        labels = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
        p1 = 1 / (1 + np.exp(-4 * z))
        out.append((labels, np.stack([1 - p1, p1], 1)))
    return out


def test_identical_rows_give_zero_and_a_uniformly_better_method_excludes_zero():
    seeds = _seeds()
    over = [_row(p, y) for y, p in seeds]
    tempered = []
    for y, p in seeds:  # logits / 4: the same argmax, the calibrated probabilities
        z = np.log(p[:, 1] / p[:, 0]) / 4
        q = 1 / (1 + np.exp(-z))
        tempered.append(_row(np.stack([1 - q, q], 1), y))
    out = paired_bootstrap({"map": over, "same": list(over), "tempered": tempered}, n_boot=300)
    assert out["same"]["nll"] == {"delta": 0.0, "lo": 0.0, "hi": 0.0}
    t = out["tempered"]
    assert t["nll"]["hi"] < 0 and t["nll"]["lo"] <= t["nll"]["delta"] <= t["nll"]["hi"]
    assert t["accuracy"] == {"delta": 0.0, "lo": 0.0, "hi": 0.0}
    expected = np.mean([nll(b.probs, b.labels) - nll(a.probs, a.labels) for a, b in zip(over, tempered)])
    assert t["nll"]["delta"] == pytest.approx(expected)


def test_an_exchangeable_method_has_an_interval_around_zero():
    rng = np.random.default_rng(3)
    seeds = _seeds()
    a, b = [], []
    for y, p in seeds:  # each row's probabilities assigned to a or b by a coin flip
        swap = rng.random(len(y)) < 0.5
        other = np.clip(p + rng.normal(0, 0.05, p.shape), 0.01, None)
        other /= other.sum(1, keepdims=True)
        a.append(_row(np.where(swap[:, None], p, other), y))
        b.append(_row(np.where(swap[:, None], other, p), y))
    out = paired_bootstrap({"map": a, "b": b}, n_boot=300)
    assert out["b"]["nll"]["lo"] < 0 < out["b"]["nll"]["hi"]


def test_member_rows_average_member_metrics_and_mismatched_rows_are_refused(tmp_path):
    (y, p), = _seeds(1, 50)
    members = np.stack([p, p[:, ::-1]])
    row = _row(p, y, members)
    assert row_metric(row, "accuracy") == pytest.approx(0.5)  # a member and its mirror image
    assert row_metric(row, "nll", np.arange(10)) == pytest.approx(
        (nll(p[:10], y[:10]) + nll(p[:10, ::-1], y[:10])) / 2)
    with pytest.raises(ValueError, match="labels differ"):
        paired_bootstrap({"map": [row], "x": [_row(p, 1 - y)]}, n_boot=5)
    with pytest.raises(ValueError, match="one result per seed"):
        paired_bootstrap({"map": [row], "x": [row, row]}, n_boot=5)
    joined = join([row, row])
    assert joined.member_probs.shape == (2, 100, 2) and len(joined.labels) == 100
    deltas = {"id": paired_bootstrap({"map": [row], "x": [_row(p, y)]}, n_boot=5)}
    forest_figure(deltas, ["nll", "ece"]).savefig(tmp_path / "forest.png")
    reliability_grid({"map": row, "x": _row(p, y)}).savefig(tmp_path / "rel.png")
    assert (tmp_path / "forest.png").stat().st_size > 0 and (tmp_path / "rel.png").stat().st_size > 0
