"""Tests for rayblora.bigbench's multiple-choice extraction on a tiny synthetic stand-in for the bigbench-1.0.0 sdist
(no network, no download): the fake sdist and fake pip of tests/test_bigbench.py, with multiple-choice tasks added."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

import test_bigbench
from rayblora import assets, bigbench
from test_bigbench import TASKS, _quiet, downloads  # noqa: F401  (downloads: the fake-pip fixture)

CHOICE_TASKS = {
    # own prefixes, a task_prefix, and one example of each kind of skip
    "toy_mc/task.json": {
        "task_prefix": "Pick the best answer.\n", "example_input_prefix": "\nQuestion: ",
        "example_output_prefix": "\nAnswer: ", "examples": [
            {"input": "Is snow cold?", "target_scores": {"Yes": 1, "No": 0}},
            {"input": "Which is a fruit?", "target_scores": {"carrot": 0, "apple": 1.0, "leek": 0.5}},
            {"input": "Tied", "target_scores": {"a": 1, "b": 1, "c": 0}},
            {"input": "Alone", "target_scores": {"only": 1}},
            {"input": "Free text", "target": "x"},
            {"input": "Blank option", "target_scores": {" ": 1, "b": 0}},
        ]},
    # subtasks (the parent task.json without examples), BIG-bench's default prefixes, the list form, and a
    # generative target beside the scores so the task has rows of both kinds
    "toy_mcsub/task.json": {"name": "toy_mcsub"},
    "toy_mcsub/b/task.json": {"examples": [
        {"input": "2 + 2?", "multiple_choice_targets": ["three", "four"], "multiple_choice_scores": [0, 1]},
    ]},
    "toy_mcsub/a/task.json": {"examples": [
        {"input": "Sky colour?", "target": "blue", "target_scores": {"green": 0, "blue": 1}},
        {"input": "Grass colour?", "target": "green", "target_scores": {"green": 1, "blue": 0}},
    ]},
}
CHOICE_COLUMNS = ["question", "choices", "label", "subtask", "answer_prefix", "input_prefix", "task_prefix"]


@pytest.fixture
def fake(downloads, monkeypatch):  # noqa: F811
    """test_bigbench's empty cache and fake pip, its sdist holding CHOICE_TASKS too; returns the pip calls."""
    monkeypatch.setattr(test_bigbench, "TASKS", {**TASKS, **CHOICE_TASKS})
    return downloads


def test_choice_rows_render_the_query_and_count_skips():
    rows, skips = bigbench.choice_rows(CHOICE_TASKS["toy_mc/task.json"], "")
    assert rows == [
        {"question": "Pick the best answer.\nIs snow cold?", "choices": ["Yes", "No"], "label": 0, "subtask": "",
         "answer_prefix": "Answer:", "input_prefix": "Question:", "task_prefix": "Pick the best answer."},
        {"question": "Pick the best answer.\nWhich is a fruit?", "choices": ["carrot", "apple", "leek"], "label": 1,
         "subtask": "", "answer_prefix": "Answer:", "input_prefix": "Question:", "task_prefix": "Pick the best answer."}]
    assert skips == {"tie": 1, "few_options": 1, "no_options": 1, "empty_option": 1}


@pytest.mark.parametrize("example, expected", [
    ({"target_scores": {"x": 0, "y": 2, "z": 1}}, (["x", "y", "z"], 1)),
    ({"multiple_choice_targets": ["x", "y"], "multiple_choice_scores": [0.2, 0.1]}, (["x", "y"], 0)),
    ({"multiple_choice_targets": ["x", "y"], "multiple_choice_scores": [1]}, "malformed"),
    ({"target_scores": {"x": True, "y": False}}, "malformed"),
    ({"target_scores": {"x": float("nan"), "y": 0}}, "malformed"),
    ({"target_scores": {}}, "few_options"),
    ({"target_scores": {str(i): i for i in range(bigbench.MAX_OPTIONS + 1)}}, "many_options"),
    ({"target": "x"}, "no_options"),
])
def test_choice_options(example, expected):
    assert bigbench.choice_options(example) == expected


def test_blank_question_is_skipped():
    rows, skips = bigbench.choice_rows({"example_input_prefix": "", "examples": [
        {"input": "  ", "target_scores": {"a": 1, "b": 0}}, {"target_scores": {"a": 1, "b": 0}}]}, "s")
    assert rows == [] and skips == {"no_input": 2}


def test_one_pass_builds_both_kinds_and_leaves_generative_files_unchanged(fake, tmp_path, monkeypatch):
    paths = bigbench.fetch_bigbench(["toy_arith", "toy_qa"], progress=_quiet,
                                    choice_tasks=["toy_mc", "toy_mcsub", "toy_arith"])
    assert len(fake) == 1
    folder = bigbench.bigbench_dir()
    assert paths == {"toy_arith": folder / "toy_arith.parquet", "toy_qa": folder / "toy_qa.parquet",
                     "choice/toy_mc": folder / "choice" / "toy_mc.parquet",
                     "choice/toy_mcsub": folder / "choice" / "toy_mcsub.parquet",
                     "choice/toy_arith": folder / "choice" / "toy_arith.parquet"}
    assert paths["choice/toy_mc"] == bigbench.choice_task_path("toy_mc")
    mc = pq.read_table(paths["choice/toy_mc"])
    assert mc.schema == bigbench.CHOICE_SCHEMA and mc.schema.names == CHOICE_COLUMNS
    assert mc.to_pydict()["label"] == [0, 1]
    sub = pq.read_table(paths["choice/toy_mcsub"]).to_pydict()  # subtasks sorted by name, default prefixes
    assert sub["question"] == ["Sky colour?", "Grass colour?", "2 + 2?"]
    assert sub["choices"] == [["green", "blue"], ["green", "blue"], ["three", "four"]]
    assert sub["label"] == [1, 0, 1] and sub["subtask"] == ["a", "a", "b"]
    assert set(sub["answer_prefix"]) == {"A:"} and set(sub["input_prefix"]) == {"Q:"} and set(sub["task_prefix"]) == {""}
    arith = pq.read_table(paths["choice/toy_arith"]).to_pydict()
    assert arith["question"] == ["What is 5 minus 3?", "Pick one"] and arith["label"] == [0, 0]
    manifest = json.loads((folder / assets.MANIFEST).read_text())
    assert set(manifest["files"]) == {"toy_arith.parquet", "toy_qa.parquet", "choice/toy_mc.parquet",
                                      "choice/toy_mcsub.parquet", "choice/toy_arith.parquet"}
    assert assets.verify_checksums(folder) == []
    # the generative files are those of a generative-only fetch, byte for byte
    monkeypatch.setenv("RAYBLORA_CACHE", str(tmp_path / "generative_only"))
    alone = bigbench.fetch_bigbench(["toy_arith", "toy_qa"], progress=_quiet)
    for task in ("toy_arith", "toy_qa"):
        assert pq.read_table(alone[task]).schema == bigbench.SCHEMA
        assert alone[task].read_bytes() == paths[task].read_bytes()


def test_progress_counts_the_skipped_examples(fake):
    messages = []
    bigbench.fetch_bigbench([], progress=messages.append, choice_tasks=["toy_mc"])
    assert messages[-1] == (f"bigbench choice/toy_mc: 2 rows (skipped: 1 empty_option, 1 few_options, "
                            f"1 no_options, 1 tie) -> {bigbench.choice_task_path('toy_mc')}")
    assert not bigbench.bigbench_path("toy_mc").exists()


def test_rerun_verifies_and_a_corrupted_choice_file_is_rebuilt_alone(fake):
    paths = bigbench.fetch_bigbench(["toy_qa"], progress=_quiet, choice_tasks=["toy_mc", "toy_mcsub"])
    messages = []
    assert bigbench.fetch_bigbench(["toy_qa"], progress=messages.append, choice_tasks=["toy_mc", "toy_mcsub"]) == paths
    assert messages == ["bigbench ok (toy_qa, choice/toy_mc, choice/toy_mcsub)"]
    before = {k: p.stat().st_mtime_ns for k, p in paths.items()}
    paths["choice/toy_mc"].write_bytes(b"garbage")
    bigbench.fetch_bigbench(["toy_qa"], progress=_quiet, choice_tasks=["toy_mc", "toy_mcsub"])
    assert pq.read_table(paths["choice/toy_mc"]).num_rows == 2
    assert all(paths[k].stat().st_mtime_ns == before[k] for k in ("toy_qa", "choice/toy_mcsub"))
    assert len(fake) == 1 and assets.verify_checksums(bigbench.bigbench_dir()) == []


def test_expected_choice_rows_are_checked_before_anything_is_written(fake, monkeypatch):
    monkeypatch.setitem(bigbench.EXPECTED_CHOICE_ROWS, "toy_mc", 5)
    with pytest.raises(assets.AssetError, match=r"choice/toy_mc: extracted 2 rows, expected 5"):
        bigbench.fetch_bigbench(["toy_qa"], progress=_quiet, choice_tasks=["toy_mc"])
    assert not bigbench.bigbench_path("toy_qa").exists()
    assert not bigbench.choice_task_path("toy_mc").exists()


def test_generative_only_task_is_refused_as_multiple_choice(fake):
    with pytest.raises(assets.AssetError, match=r"'toy_qa' has no example with `target_scores` of 2\.\.26 "
                                                r"non-blank options and a single best one \(skipped: 2 no_options\)"):
        bigbench.fetch_bigbench([], progress=_quiet, choice_tasks=["toy_qa"])


def test_empty_and_bad_selections_are_refused_before_any_download(fake):
    with pytest.raises(assets.AssetError, match="no BIG-bench task named"):
        bigbench.fetch_bigbench([], progress=_quiet)
    with pytest.raises(assets.AssetError, match="bad BIG-bench task name"):
        bigbench.fetch_bigbench([], progress=_quiet, choice_tasks=["../x"])
    assert fake == []


def test_ensure_names_the_missing_choice_file_and_its_command(fake):
    with pytest.raises(assets.AssetError, match=r"choice/toy_mc\.parquet; run `rayblora assets fetch --bigbench "
                                                r"--bigbench-tasks toy_qa --bigbench-choice --bigbench-choice-"
                                                r"tasks toy_mc`"):
        bigbench.ensure_bigbench(["toy_qa"], choice_tasks=["toy_mc"])
    bigbench.fetch_bigbench([], progress=_quiet, choice_tasks=["toy_mc"])
    assert bigbench.ensure_bigbench([], choice_tasks=["toy_mc"]) == {
        "choice/toy_mc": bigbench.choice_task_path("toy_mc")}


def test_rows_pass_rayblora_multiple_choice_format(fake):
    from rayblora.data.formats import multiple_choice_spec, rows_to_examples

    path = bigbench.fetch_bigbench([], progress=_quiet, choice_tasks=["toy_mcsub"])["choice/toy_mcsub"]
    rows = pq.read_table(path).to_pylist()
    examples = rows_to_examples(rows, multiple_choice_spec(2, "likelihood_per_token"), str(path))
    assert [e["label"] for e in examples] == [1, 0, 1] and examples[2]["choices"] == [" three", " four"]


def test_cli_fetches_choice_tasks_only_when_asked(fake, monkeypatch):
    from rayblora.cli import main

    monkeypatch.setattr(assets, "fetch_all", lambda progress=print: {})
    monkeypatch.setattr(assets, "ensure_assets", lambda: None)
    assert main(["assets", "fetch", "--bigbench-choice-tasks", "toy_mc"]) == 0 and fake == []
    assert main(["assets", "fetch", "--bigbench-choice", "--bigbench-choice-tasks", "toy_mc"]) == 0
    assert bigbench.choice_task_path("toy_mc").is_file()
    assert not bigbench.bigbench_path("qa_wikidata").exists()
    assert main(["assets", "check", "--bigbench-choice", "--bigbench-choice-tasks", "toy_mc"]) == 0
    assert main(["assets", "check", "--bigbench-choice", "--bigbench-choice-tasks", "toy_mcsub"]) == 2
