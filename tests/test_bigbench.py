"""Tests for rayblora.bigbench on a tiny synthetic stand-in for the bigbench-1.0.0 sdist (no network, no download)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rayblora import assets, bigbench

ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks"
TASKS = {
    # a task with subtasks: the parent task.json has no examples, like arithmetic's
    "toy_arith/task.json": {"name": "toy_arith", "canary": "CANARY"},
    "toy_arith/sub/task.json": {"examples": [
        {"input": "What is 5 minus 3?", "target": "2", "target_scores": {"2": 1, "7": 0}},
        {"input": "Pick one", "target_scores": {"a": 1, "b": 0}},  # multiple choice only: skipped
    ]},
    "toy_arith/add/task.json": {"examples": [
        {"input": "What is 1 plus 2?", "target": "3"},
        {"input": "What is 4 plus 4?", "target": "8"},
    ]},
    "toy_arith/add/README.md": "not a task file",
    # a task without subtasks, with its own prefixes and a list of targets
    "toy_qa/task.json": {"example_input_prefix": "\n", "example_output_prefix": " ", "examples": [
        {"input": "The capital of France is", "target": ["Paris", "paris"]},
        {"input": "The colour of snow is", "target": ["white"]},
    ]},
    "mc_only/task.json": {"examples": [{"input": "x", "target_scores": {"a": 1}}]},
}


def _fake_sdist() -> bytes:
    """A gzip tarball with the sdist's benchmark_tasks layout."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for rel, content in TASKS.items():
            data = content.encode() if isinstance(content, str) else json.dumps(content).encode()
            info = tarfile.TarInfo(f"{ROOT}/{rel}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def downloads(tmp_path, monkeypatch):
    """An empty cache and a fake pip that 'downloads' the synthetic sdist; returns the list of pip calls."""
    monkeypatch.setenv("RAYBLORA_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_pip(spec, dest, extra_args=()):
        calls.append((spec, tuple(extra_args)))
        (Path(dest) / "bigbench-1.0.0.tar.gz").write_bytes(_fake_sdist())

    monkeypatch.setattr(assets, "_pip_download", fake_pip)
    return calls


def _quiet(_msg):
    return None


def test_fetch_builds_pooled_parquet_with_subtasks(downloads):
    paths = bigbench.fetch_bigbench(["toy_arith", "toy_qa"], progress=_quiet)
    assert downloads == [("bigbench==1.0.0", ("--no-binary", ":all:"))]
    assert paths == {"toy_arith": bigbench.bigbench_path("toy_arith"), "toy_qa": bigbench.bigbench_path("toy_qa")}
    assert paths["toy_arith"] == assets.cache_dir() / "data" / "bigbench" / "toy_arith.parquet"
    arith = pq.read_table(paths["toy_arith"])
    assert arith.schema.names == ["prompt", "target", "subtask", "targets", "query"]
    assert arith.to_pydict() == {  # subtasks sorted by name, file order within one, the MC-only example skipped
        "prompt": ["What is 1 plus 2?", "What is 4 plus 4?", "What is 5 minus 3?"],
        "target": ["3", "8", "2"], "subtask": ["add", "add", "sub"], "targets": [["3"], ["8"], ["2"]],
        "query": ["Q: What is 1 plus 2?\nA:", "Q: What is 4 plus 4?\nA:", "Q: What is 5 minus 3?\nA:"]}
    qa = pq.read_table(paths["toy_qa"]).to_pydict()
    assert qa["target"] == ["Paris", "white"] and qa["targets"] == [["Paris", "paris"], ["white"]]
    assert qa["subtask"] == ["", ""] and qa["query"] == ["The capital of France is", "The colour of snow is"]
    folder = paths["toy_qa"].parent
    manifest = json.loads((folder / assets.MANIFEST).read_text())
    assert manifest["source"]["package"] == "bigbench" and manifest["source"]["version"] == "1.0.0"
    assert set(manifest["files"]) == {"toy_arith.parquet", "toy_qa.parquet"}
    assert assets.verify_checksums(folder) == []
    assert not list(assets.cache_dir().rglob("*.tmp"))


def test_rerun_verifies_instead_of_rebuilding(downloads):
    paths = bigbench.fetch_bigbench(["toy_arith", "toy_qa"], progress=_quiet)
    mtimes = {t: p.stat().st_mtime_ns for t, p in paths.items()}
    messages = []
    assert bigbench.fetch_bigbench(["toy_arith", "toy_qa"], progress=messages.append) == paths
    assert messages == ["bigbench ok (toy_arith, toy_qa)"]
    assert {t: p.stat().st_mtime_ns for t, p in paths.items()} == mtimes
    assert len(downloads) == 1


def test_corrupted_file_is_rebuilt_alone_from_the_cached_sdist(downloads):
    paths = bigbench.fetch_bigbench(["toy_arith", "toy_qa"], progress=_quiet)
    before = paths["toy_qa"].stat().st_mtime_ns
    paths["toy_arith"].write_bytes(b"garbage")
    messages = []
    bigbench.fetch_bigbench(["toy_arith", "toy_qa"], progress=messages.append)
    assert pq.read_table(paths["toy_arith"]).num_rows == 3
    assert paths["toy_qa"].stat().st_mtime_ns == before
    assert messages[0] == "using cached bigbench-1.0.0.tar.gz" and len(downloads) == 1
    assert assets.verify_checksums(paths["toy_qa"].parent) == []


def test_a_second_task_joins_the_manifest(downloads):
    bigbench.fetch_bigbench(["toy_qa"], progress=_quiet)
    bigbench.fetch_bigbench(["toy_arith"], progress=_quiet)
    manifest = json.loads((bigbench.bigbench_dir() / assets.MANIFEST).read_text())
    assert set(manifest["files"]) == {"toy_arith.parquet", "toy_qa.parquet"}


def test_unknown_task_is_named_and_nothing_is_written(downloads):
    with pytest.raises(assets.AssetError, match=r"not found in bigbench-1\.0\.0\.tar\.gz: no_such_task"):
        bigbench.fetch_bigbench(["toy_qa", "no_such_task"], progress=_quiet)
    assert not bigbench.bigbench_path("toy_qa").exists()


def test_multiple_choice_only_task_is_refused(downloads):
    with pytest.raises(assets.AssetError, match=r"'mc_only' has no example with a string `target`"):
        bigbench.fetch_bigbench(["mc_only"], progress=_quiet)


@pytest.mark.parametrize("name", ["../etc", "a/b", "", "toy qa"])
def test_bad_task_names_are_refused_before_any_download(downloads, name):
    with pytest.raises(assets.AssetError, match="bad BIG-bench task name"):
        bigbench.fetch_bigbench([name], progress=_quiet)
    assert downloads == []


def test_ensure_names_the_missing_file(downloads):
    with pytest.raises(assets.AssetError, match=r"toy_qa\.parquet; run `rayblora assets fetch --bigbench "
                                                r"--bigbench-tasks toy_qa`"):
        bigbench.ensure_bigbench(["toy_qa"])
    with pytest.raises(assets.AssetError, match=r"qa_wikidata\.parquet; run `make assets-bigbench`"):
        bigbench.ensure_bigbench(["qa_wikidata"])
    bigbench.fetch_bigbench(["toy_qa"], progress=_quiet)
    assert bigbench.ensure_bigbench(["toy_qa"]) == {"toy_qa": bigbench.bigbench_path("toy_qa")}


def test_cli_fetches_bigbench_only_when_asked(downloads, monkeypatch, capsys):
    from rayblora.cli import main

    monkeypatch.setattr(assets, "fetch_all", lambda progress=print: {})
    monkeypatch.setattr(assets, "ensure_assets", lambda: None)
    assert main(["assets", "fetch"]) == 0 and downloads == []
    assert main(["assets", "fetch", "--bigbench", "--bigbench-tasks", "toy_qa,toy_arith"]) == 0
    assert bigbench.bigbench_path("toy_qa").is_file() and bigbench.bigbench_path("toy_arith").is_file()
    assert main(["assets", "check", "--bigbench", "--bigbench-tasks", "toy_qa"]) == 0
    assert main(["assets", "check", "--bigbench", "--bigbench-tasks", "nope"]) == 2
    assert "nope.parquet" in capsys.readouterr().err


def test_the_release_file_a_user_has_replaces_the_download(downloads, tmp_path, monkeypatch):
    """The registry no longer serves bigbench==1.0.0: a download that fails says so and names --bigbench-sdist;
    a release file given by path is used without pip."""
    def failing(spec, dest, extra_args=()):
        raise assets.AssetError("could not download bigbench==1.0.0 with pip (exit 1)")

    fake = assets._pip_download
    monkeypatch.setattr(assets, "_pip_download", failing)
    with pytest.raises(assets.AssetError, match="no longer served.*--bigbench-sdist"):
        bigbench.fetch_bigbench(["toy_qa"], progress=_quiet)
    monkeypatch.setattr(assets, "_pip_download", fake)
    release = tmp_path / "bigbench-1.0.0.tar.gz"
    release.write_bytes(_fake_sdist())
    paths = bigbench.fetch_bigbench(["toy_qa"], progress=_quiet, sdist=release)
    assert pq.read_table(paths["toy_qa"]).num_rows == 2 and downloads == []
    not_a_release = tmp_path / "notes.txt"
    not_a_release.write_text("no")
    with pytest.raises(assets.AssetError, match="not a readable"):
        bigbench.fetch_bigbench(["toy_arith"], progress=_quiet, sdist=not_a_release)
