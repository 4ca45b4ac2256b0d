"""Each flow reads an artifact once at its front door (fit, evaluate, serve start-up), and refuses a family the
artifact cannot build before any model loads."""

import builtins
import collections
import io
import os
from pathlib import Path

import pytest

from conftest import tiny_overrides
from rayblora.artifact import load_posterior, save_posterior
from rayblora.cli import main
from rayblora.registry import get_posterior_class


@pytest.fixture(scope="module")
def ensemble_dir(trained_members, tiny_session_config, tmp_path_factory):
    scorer, states, infos = trained_members
    post = get_posterior_class("ensemble").build(scorer, states, infos)
    return save_posterior(post, tmp_path_factory.mktemp("flows") / "posterior", model_config=tiny_session_config.model,
                          adapter_config=tiny_session_config.adapter).resolve()


@pytest.fixture
def reads(monkeypatch):
    """Counts of files opened for reading, by path, while the test runs (builtins.open and io.open, which
    pathlib's read_bytes / read_text go through)."""
    counts: collections.Counter = collections.Counter()
    real = io.open

    def counting_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and not set(mode) & set("wax+"):
            counts[Path(os.fspath(file)).resolve()] += 1
        return real(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    return counts


def _under(counts: collections.Counter, root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): n for p, n in counts.items() if root in p.parents}


def _assert_read_once(counts: collections.Counter, root: Path) -> None:
    read = _under(counts, root)
    assert read.get("manifest.json") == 1, read
    assert max(read.values()) == 1, read  # every member and family file: once (checksum and tensors together)


def test_evaluate_reads_the_artifact_once(ensemble_dir, sentiment_files, tmp_path, reads):
    overrides = tiny_overrides(sentiment_files, tmp_path / "run")
    assert main(["evaluate", "--posterior", str(ensemble_dir), "--methods", "map,ensemble,temperature",
                 *overrides]) == 0
    _assert_read_once(reads, ensemble_dir)


def test_fit_reads_the_parent_artifact_once(ensemble_dir, sentiment_files, tmp_path, reads):
    overrides = tiny_overrides(sentiment_files, tmp_path / "run", **{"laplace.fit_batches": "1",
                                                                      "laplace.link_samples": "5"})
    assert main(["fit", "--posterior", str(ensemble_dir), "--method", "laplace_ensemble", *overrides]) == 0
    _assert_read_once(reads, ensemble_dir)
    assert load_posterior(tmp_path / "run" / "posterior-laplace_ensemble").method == "laplace_ensemble"


def test_serve_start_up_reads_each_artifact_once_and_a_replica_once_more(ensemble_dir, reads):
    from rayblora.serve.app import check_posteriors
    from rayblora.serve.engine import PosteriorPool

    entries = check_posteriors({"ens": str(ensemble_dir)})
    _assert_read_once(reads, ensemble_dir)
    assert check_posteriors(entries) == entries  # checked entries pass on without a read
    _assert_read_once(reads, ensemble_dir)
    reads.clear()
    PosteriorPool(entries, load_posterior).load("ens")  # a replica's own read, when the posterior is first asked for
    _assert_read_once(reads, ensemble_dir)


def test_a_family_the_artifact_cannot_build_is_refused_before_the_model_loads(ensemble_dir, sentiment_files,
                                                                              tmp_path, monkeypatch, capsys):
    import rayblora.artifact

    def no_model(*_a, **_k):
        raise AssertionError("the base model was loaded")

    overrides = tiny_overrides(sentiment_files, tmp_path / "run")
    monkeypatch.setattr(rayblora.artifact, "build_scorer", no_model)
    assert main(["evaluate", "--posterior", str(ensemble_dir), "--methods", "map,multiswag,blob", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rayblora: error: ")
    assert "multiswag needs the SWAG moments" in err[0] and "blob needs the A variances" in err[0], err
    assert "'ensemble' artifact" in err[0]
    assert main(["generate", "--posterior", str(ensemble_dir), "--prompt", "x", "--method", "swag"]) == 2
    assert main(["evaluate", "--posterior", str(ensemble_dir), "--methods", "nope", *overrides]) == 2
    assert "unknown posterior method 'nope'" in capsys.readouterr().err


def test_families_from_the_configs_defaults_that_the_artifact_cannot_build_are_skipped(
        ensemble_dir, sentiment_files, tmp_path, capsys):
    overrides = tiny_overrides(sentiment_files, tmp_path / "run",
                               **{"posterior.eval_methods": "[map,ensemble,multiswag]"})
    assert main(["evaluate", "--posterior", str(ensemble_dir), *overrides]) == 0
    out = capsys.readouterr().out
    assert "[evaluate] skipping multiswag: needs the SWAG moments" in out
    rows = {line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")}
    assert {"map", "ensemble"} <= rows and "multiswag" not in rows
