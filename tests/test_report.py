"""Tests for rayblora.report (JSON layout, markdown, PNG output)."""

import json
import math

import numpy as np
import pytest

from rayblora.metrics import classification_metrics, ood_auroc
from rayblora.report import SplitResult, build_report, render_markdown, write_report

METHODS = ["map", "laplace_lora"]
SPLITS = ["obqa", "arc_e", "arc_c"]
METRIC_KEYS = {"accuracy", "nll", "ece", "ece_em", "brier", "auroc", "aurc", "acc_at_90", "reject10"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _split_result(rng, n=120, c=4, members=5):
    """Random ensemble-style predictions with entropy / mutual information."""
    member_probs = rng.dirichlet(np.full(c, 0.7), size=(members, n))  # (M, N, C)
    probs = member_probs.mean(axis=0)
    probs /= probs.sum(axis=1, keepdims=True)
    entropy = -np.sum(probs * np.log(probs), axis=1)
    member_ent = -np.sum(member_probs * np.log(member_probs), axis=2).mean(axis=0)
    return SplitResult(probs=probs, labels=rng.integers(0, c, size=n),
                       entropy=entropy, mutual_information=entropy - member_ent)


@pytest.fixture
def results():
    rng = np.random.default_rng(0)
    return {m: {s: _split_result(rng) for s in SPLITS} for m in METHODS}


META = {"model": "tiny-llama", "steps": 100, "members": np.int64(5)}


def _strict_load(path):
    def reject(name):
        raise AssertionError(f"non-strict JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=reject)


def test_write_report_files_and_json_layout(tmp_path, results):
    out = tmp_path / "eval"
    report = write_report(out, results, in_domain="obqa", meta=META, n_bins=10)
    assert sorted(p.name for p in out.iterdir()) == [
        "coverage.png", "reliability.png", "report.json", "report.md"]  # no temp files left
    data = _strict_load(out / "report.json")
    assert set(data) == {"methods", "ood", "meta", "far_ood"}
    assert data["meta"] == {"model": "tiny-llama", "steps": 100, "members": 5}
    assert list(data["methods"]) == METHODS and list(data["ood"]) == METHODS
    for m in METHODS:
        assert list(data["methods"][m]) == SPLITS
        for s in SPLITS:
            assert set(data["methods"][m][s]) == METRIC_KEYS
            assert all(isinstance(v, float) for v in data["methods"][m][s].values())
        assert list(data["ood"][m]) == ["arc_e", "arc_c"]
        for s in ("arc_e", "arc_c"):
            assert set(data["ood"][m][s]) == {"auroc_entropy", "auroc_mi"}
            assert 0.0 <= data["ood"][m][s]["auroc_mi"] <= 1.0
    assert data["methods"] == report["methods"] and data["ood"] == report["ood"]
    for name in ("reliability.png", "coverage.png"):
        blob = (out / name).read_bytes()
        assert blob[:8] == PNG_MAGIC and len(blob) > 1000


def test_report_values_match_metrics(results):
    report = build_report(results, "obqa", META, n_bins=10)
    r = results["map"]["arc_c"]
    assert report["methods"]["map"]["arc_c"] == classification_metrics(
        r.probs, r.labels, r.entropy, n_bins=10)
    ref = results["map"]["obqa"]
    assert report["ood"]["map"]["arc_c"] == {
        "auroc_entropy": ood_auroc(ref.entropy, r.entropy),
        "auroc_mi": ood_auroc(ref.mutual_information, r.mutual_information),
    }


def test_render_markdown_contains_everything(tmp_path, results):
    write_report(tmp_path, results, "obqa", META)
    md = (tmp_path / "report.md").read_text()
    assert md == render_markdown(build_report(results, "obqa", META))
    for token in METHODS + SPLITS + ["tiny-llama", "100", "ACC@90", "AUROC (MI)"]:
        assert token in md
    acc = build_report(results, "obqa", META)["methods"]["map"]["arc_e"]["accuracy"]
    assert f"| map | arc_e | {acc:.4f} |" in md
    metric_rows = [ln for ln in md.splitlines() if ln.startswith("| map |")
                   or ln.startswith("| laplace_lora |")]
    assert len(metric_rows) == 6 + 4  # 2x3 metric rows, 2x2 OOD rows
    assert all(ln.count("|") == 12 for ln in metric_rows[:6])


def test_nan_written_as_null(tmp_path):
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    res = SplitResult(probs, np.array([0, 1, 0]), np.array([0.3, 0.5, 0.6]),
                      np.array([0.01, 0.02, 0.03]))
    report = write_report(tmp_path, {"map": {"id": res, "ood": res}}, "id", {"model": "x"})
    assert math.isnan(report["methods"]["map"]["id"]["auroc"])  # all correct
    data = _strict_load(tmp_path / "report.json")
    assert data["methods"]["map"]["id"]["auroc"] is None
    assert data["ood"]["map"]["ood"]["auroc_entropy"] == 0.5
    assert "n/a" in (tmp_path / "report.md").read_text()


def test_build_report_validation(results):
    with pytest.raises(ValueError, match="in_domain"):
        build_report(results, "missing", META)
    with pytest.raises(ValueError, match="results"):
        build_report({}, "obqa", META)
    with pytest.raises(ValueError, match="mutual_information"):
        SplitResult(np.eye(2), np.array([0, 1]), np.zeros(2), np.zeros(3))


def test_member_row_reports_mean_and_sd_over_members(tmp_path):
    """A `map` row of K = 3 members: each metric is the mean of the members' own metrics, with their sd."""
    rng = np.random.default_rng(0)
    members = rng.dirichlet([1.0, 1.0], size=(3, 40))
    labels = rng.integers(0, 2, 40)
    ent = -(members[0] * np.log(members[0])).sum(-1)
    row = SplitResult(members[0], labels, ent, np.zeros(40), member_probs=members)
    report = write_report(tmp_path, {"map": {"id": row}}, "id", {})
    each = [classification_metrics(p, labels, -(p * np.log(p)).sum(-1)) for p in members]
    got = report["methods"]["map"]["id"]
    assert got["nll"] == pytest.approx(np.mean([m["nll"] for m in each]))
    assert got["sd"]["ece"] == pytest.approx(np.std([m["ece"] for m in each], ddof=1))
    assert got["members"] == 3
    assert f"{got['accuracy']:.4f} ± {got['sd']['accuracy']:.4f}" in (tmp_path / "report.md").read_text()
    with pytest.raises(ValueError, match="member_probs"):
        SplitResult(members[0], labels, ent, np.zeros(40), member_probs=members[:, :10])


def test_far_ood_splits_get_ood_aurocs_and_no_metrics_row(tmp_path):
    rng = np.random.default_rng(1)
    probs = rng.dirichlet([1.0, 1.0], size=30)

    def row(mi_scale):
        return SplitResult(probs, np.zeros(30, int), rng.random(30), rng.random(30) * mi_scale)

    report = write_report(tmp_path, {"ensemble": {"id": row(1.0), "news": row(5.0)}}, "id", {}, far_ood=["news"])
    assert list(report["methods"]["ensemble"]) == ["id"] and report["far_ood"] == ["news"]
    assert report["ood"]["ensemble"]["news"]["auroc_mi"] > 0.8
    assert "| ensemble | news |" in (tmp_path / "report.md").read_text()  # in the OOD table only
