"""Hand-computed checks for rayblora.metrics."""

import math

import numpy as np
import pytest

from rayblora import metrics as M


def _binary(confs_for_class0):
    """(N, 2) probs from p(class 0) values."""
    p0 = np.asarray(confs_for_class0, dtype=float)
    return np.stack([p0, 1.0 - p0], axis=1)


# --------------------------------------------------------------------------- #
# accuracy / nll / brier
# --------------------------------------------------------------------------- #
def test_accuracy_hand():
    probs = _binary([0.9, 0.2, 0.6, 0.4])  # predictions 0, 1, 0, 1
    assert M.accuracy(probs, np.array([0, 1, 1, 0])) == pytest.approx(0.5)
    assert M.accuracy(probs, np.array([0, 1, 0, 1])) == pytest.approx(1.0)


def test_nll_hand_and_eps():
    probs = np.array([[0.5, 0.5], [0.25, 0.75]])
    expected = -(math.log(0.5) + math.log(0.75)) / 2
    assert M.nll(probs, np.array([1, 1])) == pytest.approx(expected)
    zero = np.array([[1.0, 0.0]])
    assert M.nll(zero, np.array([1])) == pytest.approx(-math.log(1e-12))
    assert M.nll(zero, np.array([1]), eps=1e-3) == pytest.approx(-math.log(1e-3))


def test_brier_hand():
    onehot = np.eye(3)
    assert M.brier(onehot, np.array([0, 1, 2])) == 0.0
    # wrong one-hot: (1-0)^2 + (0-1)^2 = 2
    assert M.brier(onehot, np.array([1, 2, 0])) == pytest.approx(2.0)
    # uniform binary: 0.25 + 0.25
    assert M.brier(_binary([0.5, 0.5]), np.array([0, 1])) == pytest.approx(0.5)
    # mean over examples of (0.7-1)^2 + 0.3^2 = 0.18 and 0
    probs = np.array([[0.7, 0.3], [0.0, 1.0]])
    assert M.brier(probs, np.array([0, 1])) == pytest.approx(0.09)


# --------------------------------------------------------------------------- #
# calibration
# --------------------------------------------------------------------------- #
def test_ece_four_examples_by_hand():
    # confidences .9 (right), .85 (wrong), .7 (right), .55 (wrong); 5 bins
    probs = _binary([0.9, 0.85, 0.3, 0.55])  # preds 0, 0, 1, 0
    labels = np.array([0, 1, 1, 1])
    # bin (.8,1]: acc .5 conf .875 -> .375 * 2/4
    # bin (.6,.8]: acc 1 conf .7 -> .3 * 1/4
    # bin (.4,.6]: acc 0 conf .55 -> .55 * 1/4
    expected = 0.5 * 0.375 + 0.25 * 0.3 + 0.25 * 0.55
    assert expected == pytest.approx(0.4)
    assert M.ece(probs, labels, n_bins=5) == pytest.approx(expected)


def test_ece_perfectly_calibrated_is_zero():
    # conf 0.75 in every row, 3 of 4 correct
    probs = _binary([0.75, 0.75, 0.75, 0.75])
    assert M.ece(probs, np.array([0, 0, 0, 1])) == pytest.approx(0.0, abs=1e-12)


def test_reliability_bins_right_closed_edges():
    # conf 0.5 falls in (0, 0.5], conf 1.0 in (0.5, 1]
    probs = np.array([[0.5, 0.5], [1.0, 0.0], [0.2, 0.8]])
    bins = M.reliability_bins(probs, np.array([0, 1, 1]), n_bins=2)
    assert set(bins) == {"centers", "accuracy", "confidence", "counts"}
    np.testing.assert_array_equal(bins["counts"], [1, 2])
    np.testing.assert_allclose(bins["centers"], [0.25, 0.75])
    np.testing.assert_allclose(bins["accuracy"], [1.0, 0.5])
    np.testing.assert_allclose(bins["confidence"], [0.5, 0.9])


def test_reliability_bins_empty_bins_are_nan():
    bins = M.reliability_bins(_binary([0.95, 0.97]), np.array([0, 0]), n_bins=10)
    assert bins["counts"].sum() == 2 and bins["counts"][9] == 2
    assert np.isnan(bins["accuracy"][:9]).all()
    assert np.isnan(bins["confidence"][:9]).all()
    for key in bins:
        assert bins[key].shape == (10,)


# --------------------------------------------------------------------------- #
# AUROC
# --------------------------------------------------------------------------- #
def test_error_auroc_perfect_reversed_ties():
    u = np.array([0.1, 0.2, 0.8, 0.9])
    assert M.error_auroc(u, np.array([0, 0, 1, 1])) == pytest.approx(1.0)
    assert M.error_auroc(u, np.array([1, 1, 0, 0])) == pytest.approx(0.0)
    assert M.error_auroc(np.ones(4), np.array([0, 1, 0, 1])) == pytest.approx(0.5)


def test_error_auroc_hand_partial_and_ties():
    # error pairs: (2>1 win, 2<3 loss, 4>1 win, 4>3 win) -> 3/4
    u = np.array([1.0, 2.0, 3.0, 4.0])
    assert M.error_auroc(u, np.array([False, True, False, True])) == pytest.approx(0.75)
    # error at 1 vs correct 1 (tie, 1/2) and vs correct 2 (loss) -> 0.25
    assert M.error_auroc(np.array([1.0, 1.0, 2.0]), np.array([1, 0, 0])) == pytest.approx(0.25)


def test_error_auroc_matches_brute_force():
    rng = np.random.default_rng(0)
    u = rng.integers(0, 5, size=60).astype(float)  # many ties
    e = rng.random(60) < 0.4
    pos, neg = u[e], u[~e]
    diff = pos[:, None] - neg[None, :]
    brute = ((diff > 0) + 0.5 * (diff == 0)).mean()
    assert M.error_auroc(u, e) == pytest.approx(brute)


def test_error_auroc_single_class_is_nan():
    assert math.isnan(M.error_auroc(np.array([0.1, 0.5]), np.array([0, 0])))
    assert math.isnan(M.error_auroc(np.array([0.1, 0.5]), np.array([1, 1])))


def test_ood_auroc():
    assert M.ood_auroc(np.array([0.1, 0.2]), np.array([0.8, 0.9])) == pytest.approx(1.0)
    assert M.ood_auroc(np.array([0.8, 0.9]), np.array([0.1, 0.2])) == pytest.approx(0.0)
    assert M.ood_auroc(np.full(3, 0.4), np.full(5, 0.4)) == pytest.approx(0.5)
    # out 2.5 beats in {1, 2}, loses to 3 -> 2/3
    assert M.ood_auroc(np.array([1.0, 2.0, 3.0]), np.array([2.5])) == pytest.approx(2 / 3)


# --------------------------------------------------------------------------- #
# selective prediction
# --------------------------------------------------------------------------- #
def test_aurc_known_ordering():
    u = np.array([0.4, 0.1, 0.3, 0.2])  # certain-first order: idx 1, 3, 2, 0
    errors = np.array([1, 0, 0, 1])  # sorted errors: 0, 1, 0, 1
    expected = (0 + 1 / 2 + 1 / 3 + 2 / 4) / 4
    assert M.aurc(u, errors) == pytest.approx(expected)
    assert M.aurc(u, np.zeros(4)) == 0.0
    assert M.aurc(u, np.ones(4)) == pytest.approx(1.0)


def test_aurc_ties_use_stable_order():
    assert M.aurc(np.zeros(2), np.array([1, 0])) == pytest.approx((1 + 0.5) / 2)
    assert M.aurc(np.zeros(2), np.array([0, 1])) == pytest.approx((0 + 0.5) / 2)


def _selective_case():
    """10 examples, uncertainty reversed; errors at certain-ranks 2, 7, 9."""
    n = 10
    u = np.arange(n, 0, -1).astype(float)  # rank r (0 = most certain) is idx n-1-r
    correct_by_rank = np.ones(n, bool)
    correct_by_rank[[2, 7, 9]] = False
    labels = np.zeros(n, int)
    preds = np.where(correct_by_rank[::-1], 0, 1)  # idx i has rank n-1-i
    probs = np.eye(2)[preds] * 0.8 + 0.1
    return probs, labels, u


def test_accuracy_at_coverage():
    probs, labels, u = _selective_case()
    assert M.accuracy_at_coverage(probs, labels, u, 0.9) == pytest.approx(7 / 9)
    assert M.accuracy_at_coverage(probs, labels, u) == pytest.approx(7 / 9)
    assert M.accuracy_at_coverage(probs, labels, u, 1.0) == pytest.approx(0.7)
    assert M.accuracy_at_coverage(probs, labels, u, 0.25) == pytest.approx(2 / 3)  # ceil 2.5
    assert M.accuracy_at_coverage(probs, labels, u, 0.7) == pytest.approx(6 / 7)
    assert M.accuracy_at_coverage(probs, labels, u, 0.01) == pytest.approx(1.0)  # k >= 1


def test_accuracy_at_coverage_ties_stable():
    probs = np.eye(2)[[1, 0, 0, 0]]  # first example wrong for label 0
    labels = np.zeros(4, int)
    assert M.accuracy_at_coverage(probs, labels, np.zeros(4), 0.5) == pytest.approx(0.5)


def test_risk_coverage_curve():
    probs, labels, u = _selective_case()
    cov, acc = M.risk_coverage_curve(probs, labels, u)
    np.testing.assert_allclose(cov, np.arange(1, 11) / 10)
    assert acc.shape == (10,)
    assert acc[0] == 1.0 and acc[2] == pytest.approx(2 / 3)
    assert acc[-1] == pytest.approx(M.accuracy(probs, labels))
    errors = probs.argmax(1) != labels
    assert np.mean(1 - acc) == pytest.approx(M.aurc(u, errors))


def test_classification_metrics_keys_and_values():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(4), size=50)
    labels = rng.integers(0, 4, size=50)
    u = -np.sum(probs * np.log(probs), axis=1)
    out = M.classification_metrics(probs, labels, u, n_bins=10)
    assert list(out) == ["accuracy", "nll", "ece", "ece_em", "brier", "auroc", "aurc", "acc_at_90", "reject10"]
    assert all(type(v) is float for v in out.values())
    errors = probs.argmax(1) != labels
    assert out["accuracy"] == M.accuracy(probs, labels)
    assert out["ece"] == M.ece(probs, labels, n_bins=10)
    assert out["auroc"] == M.error_auroc(u, errors)
    assert out["aurc"] == M.aurc(u, errors)
    assert out["acc_at_90"] == M.accuracy_at_coverage(probs, labels, u, 0.9)


# --------------------------------------------------------------------------- #
# validation
# --------------------------------------------------------------------------- #
GOOD_P = np.array([[0.6, 0.4], [0.1, 0.9]])
GOOD_Y = np.array([0, 1])
GOOD_U = np.array([0.3, 0.2])


@pytest.mark.parametrize(
    "probs, labels, match",
    [
        (np.array([0.6, 0.4]), GOOD_Y, "probs"),  # 1-D
        (np.zeros((0, 2)), np.zeros(0, int), "probs"),  # empty
        (np.array([[0.6, 0.5], [0.1, 0.9]]), GOOD_Y, "probs"),  # row sums 1.1
        (np.array([[1.2, -0.2], [0.1, 0.9]]), GOOD_Y, "probs"),  # negative
        (np.array([[np.nan, 0.4], [0.1, 0.9]]), GOOD_Y, "probs"),
        (GOOD_P, np.array([0, 1, 1]), "labels"),  # length mismatch
        (GOOD_P, np.array([0, 2]), "labels"),  # out of range
        (GOOD_P, np.array([-1, 0]), "labels"),
        (GOOD_P, np.array([0.5, 1.0]), "labels"),  # non-integer
        (GOOD_P, np.array([[0, 1]]), "labels"),  # 2-D
    ],
)
def test_probs_labels_validation(probs, labels, match):
    for fn in (M.accuracy, M.nll, M.ece, M.brier, M.reliability_bins):
        with pytest.raises(ValueError, match=match):
            fn(probs, labels)


def test_probs_sum_tolerance():
    ok = np.array([[0.6 + 5e-5, 0.4], [0.1, 0.9]])
    assert M.accuracy(ok, GOOD_Y) == 1.0
    bad = np.array([[0.6 + 5e-4, 0.4], [0.1, 0.9]])
    with pytest.raises(ValueError, match="sum to 1"):
        M.accuracy(bad, GOOD_Y)


def test_uncertainty_and_errors_validation():
    with pytest.raises(ValueError, match="uncertainty"):
        M.accuracy_at_coverage(GOOD_P, GOOD_Y, np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="uncertainty"):
        M.classification_metrics(GOOD_P, GOOD_Y, np.array([np.nan, 0.1]))
    with pytest.raises(ValueError, match="uncertainty"):
        M.risk_coverage_curve(GOOD_P, GOOD_Y, np.array([[0.1, 0.2]]))
    with pytest.raises(ValueError, match="errors"):
        M.aurc(GOOD_U, np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="errors"):
        M.error_auroc(GOOD_U, np.array([0, 2]))
    with pytest.raises(ValueError, match="uncertainty"):
        M.aurc(np.array([]), np.array([]))
    with pytest.raises(ValueError, match="uncertainty_out"):
        M.ood_auroc(GOOD_U, np.array([]))
    with pytest.raises(ValueError, match="uncertainty_in"):
        M.ood_auroc(np.array([[0.1]]), GOOD_U)


def test_parameter_validation():
    with pytest.raises(ValueError, match="n_bins"):
        M.ece(GOOD_P, GOOD_Y, n_bins=0)
    with pytest.raises(ValueError, match="n_bins"):
        M.reliability_bins(GOOD_P, GOOD_Y, n_bins=2.5)
    for cov in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="coverage"):
            M.accuracy_at_coverage(GOOD_P, GOOD_Y, GOOD_U, coverage=cov)


def test_equal_mass_ece_by_hand():
    """Two bins of two: confidences (0.6, 0.7 | 0.8, 0.9), correct (1, 0 | 1, 1):
    (2/4)|0.5 - 0.65| + (2/4)|1 - 0.85| = 0.15."""
    probs = np.array([[0.6, 0.4], [0.3, 0.7], [0.8, 0.2], [0.1, 0.9]])
    labels = np.array([0, 0, 0, 1])
    assert M.ece_equal_mass(probs, labels, n_bins=2) == pytest.approx(0.15)


def test_rejection_error_reduction_by_hand():
    """Ten examples, two errors; the most uncertain one is an error: rejecting 10 % halves the error rate
    among the kept nine (2/10 -> 1/9): (0.2 - 1/9) / 0.2."""
    probs = np.tile([[0.9, 0.1]], (10, 1))
    labels = np.array([0] * 8 + [1, 1])
    u = np.arange(10.0)
    u[8] = -1.0  # one error is the most certain, the other (index 9) the most uncertain
    assert M.rejection_error_reduction(probs, labels, u, 0.1) == pytest.approx((0.2 - 1 / 9) / 0.2)
    assert np.isnan(M.rejection_error_reduction(probs, np.zeros(10, int), u, 0.1))
    with pytest.raises(ValueError, match="fraction"):
        M.rejection_error_reduction(probs, labels, u, 1.0)
