"""Task formats, user files (JSONL / CSV / Parquet / datasets folder), deterministic splits, bad files."""

import json

import pytest

from rayblora.config import load_config
from rayblora.data import DataError, load_task_data, train_batch_indices
from rayblora.data.formats import format_multiple_choice


def _cfg(task, shifts=(), **sizes):
    values = {"train_size": 0, "val_size": 4, "test_size": 4, **sizes}
    return load_config(None, [f"data.task={task}", f"data.shift_tasks=[{','.join(map(str, shifts))}]"]
                       + [f"data.{k}={v}" for k, v in values.items()]).data


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [{"text": f"review number {i}", "label": i % 2} for i in range(20)]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "datasets"])
def test_user_formats_load_the_same_examples(tmp_path, fmt):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    path = tmp_path / f"d.{fmt}"
    {"jsonl": lambda: ds.to_json(str(path)), "csv": lambda: ds.to_csv(str(path), index=False),
     "parquet": lambda: ds.to_parquet(str(path)), "datasets": lambda: ds.save_to_disk(str(path))}[fmt]()
    data = load_task_data(_cfg(path))
    assert (len(data.train), len(data.validation), len(data.test)) == (12, 4, 4)
    assert data.spec.choices == (" negative", " positive")
    assert data.test[0]["prompt"].startswith("Review: review number")
    assert set(data.train["num_choices"]) == {2}


def test_splits_are_deterministic_and_disjoint(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", ROWS)
    a, b = load_task_data(_cfg(path)), load_task_data(_cfg(path))
    assert a.test["prompt"] == b.test["prompt"] and a.train["prompt"] == b.train["prompt"]
    sets = [set(x["prompt"]) for x in (a.train, a.validation, a.test)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    c = load_task_data(load_config(None, [f"data.task={path}", "data.shift_tasks=[]", "data.val_size=4",
                                          "data.test_size=4", "data.train_size=0", "data.seed=1"]).data)
    assert c.test["prompt"] != a.test["prompt"]


def test_string_labels_and_multiple_choice(tmp_path):
    path = _jsonl(tmp_path / "s.jsonl", [{"text": f"t{i}", "label": ["negative", "positive"][i % 2]}
                                         for i in range(12)])
    assert sorted(set(load_task_data(_cfg(path)).train["label"])) == [0, 1]
    mc = _jsonl(tmp_path / "mc.jsonl", [{"question": f"q{i}?", "choices": ["x", "y", "z"][: 2 + i % 2],
                                         "label": i % 2} for i in range(12)])
    data = load_task_data(_cfg(mc))
    assert data.spec.kind == "multiple_choice" and data.spec.choices == (" A", " B", " C")
    assert set(data.train["num_choices"]) == {2, 3}
    assert format_multiple_choice("Why?", ["a", "b"]) == "Question: Why?\nA. a\nB. b\nAnswer:"


@pytest.mark.parametrize("rows, message", [
    ([{"txt": "a", "label": 0}] * 10, r"columns 'text' \+ 'label'"),
    ([{"text": "a"}] * 10, "missing column 'label'"),
    ([{"text": "a", "label": 0}] * 5 + [{"text": "b", "label": 7}] * 5, r"row 5, column 'label': 7 is out of range"),
    ([{"text": "a", "label": 0}] * 5 + [{"text": "", "label": 1}] * 5, r"row 5, column 'text'"),
    ([{"text": "a", "label": "meh"}] * 10, r"row 0, column 'label'"),
    ([{"question": "q", "choices": ["only"], "label": 0}] * 10, r"row 0, column 'choices'"),
    ([{"question": "q", "choices": ["a", "b"], "label": 2}] * 10, r"row 0, column 'label'"),
])
def test_bad_rows_name_file_row_and_column(tmp_path, rows, message):
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=message) as info:
        load_task_data(_cfg(path))
    assert "bad.jsonl" in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="neither a built-in task"):
        load_task_data(_cfg(tmp_path / "missing.jsonl"))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        load_task_data(_cfg(tmp_path / "d.txt"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl"):
        load_task_data(_cfg(tmp_path / "empty.jsonl"))
    small = _jsonl(tmp_path / "small.jsonl", ROWS[:6])
    with pytest.raises(DataError, match="empty split"):
        load_task_data(_cfg(small))
    (tmp_path / "broken.jsonl").write_text('{"text": "a", "label": 0}\n{not json\n')
    with pytest.raises(DataError, match="broken.jsonl"):
        load_task_data(_cfg(tmp_path / "broken.jsonl"))


def test_shift_tasks_must_share_labels(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", ROWS)
    mc = _jsonl(tmp_path / "mc.jsonl", [{"question": "q", "choices": ["a", "b", "c"], "label": 0}] * 10)
    with pytest.raises(DataError, match="share the labels"):
        load_task_data(_cfg(path, shifts=[mc]))
    data = load_task_data(_cfg(path, shifts=[path]))
    assert list(data.shifts) == ["d"] and len(data.shifts["d"]) == 4


def test_joint_tasks_pool_training_and_validation_splits_as_each_task_splits_alone(tmp_path):
    from rayblora.config import ConfigError

    first = _jsonl(tmp_path / "first.jsonl", ROWS)
    second = _jsonl(tmp_path / "second.jsonl", [{"text": f"other text {i}", "label": i % 2} for i in range(16)])
    alone = {p: load_task_data(_cfg(p)) for p in (first, second)}
    pooled = load_task_data(load_config(None, [f"data.task={first}", f"data.joint_tasks=[{second}]",
                                               "data.shift_tasks=[]", "data.val_size=4", "data.test_size=4",
                                               "data.train_size=0"]).data)
    prompts = lambda split: list(split["prompt"])  # noqa: E731
    assert prompts(pooled.train) == prompts(alone[first].train) + prompts(alone[second].train)
    assert prompts(pooled.validation) == prompts(alone[first].validation) + prompts(alone[second].validation)
    assert prompts(pooled.test) == prompts(alone[first].test)  # evaluation stays on the task's own test split
    with pytest.raises(ConfigError, match="data.joint_tasks"):
        load_config(None, [f"data.task={first}", f"data.joint_tasks=[{first}]"])
    mc = _jsonl(tmp_path / "mc.jsonl", [{"question": "q", "choices": ["a", "b", "c"], "label": 0}] * 20)
    with pytest.raises(DataError, match="data.joint_tasks.*share the labels"):
        load_task_data(load_config(None, [f"data.task={first}", f"data.joint_tasks=[{mc}]", "data.shift_tasks=[]",
                                          "data.val_size=4", "data.test_size=4"]).data)


def test_training_order_is_a_pure_function_of_the_batch_number():
    first = [train_batch_indices(10, 3, seed=5, batch_number=b).tolist() for b in range(6)]
    again = [train_batch_indices(10, 3, seed=5, batch_number=b).tolist() for b in range(6)]
    assert first == again
    epoch0 = sum(first[:3], [])
    assert len(set(epoch0)) == 9
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_batch_indices(2, 3, 0, 0)


def test_far_ood_text_is_fed_through_the_task_prompt(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", ROWS)
    far = _jsonl(tmp_path / "news.jsonl", [{"text": f"usenet post {i}"} for i in range(10)])
    cfg = load_config(None, [f"data.task={path}", "data.shift_tasks=[]", f"data.far_ood_tasks=[{far}]",
                             "data.val_size=4", "data.test_size=4", "data.train_size=0"]).data
    data = load_task_data(cfg)
    assert list(data.far_ood) == ["news"] and len(data.far_ood["news"]) == 4
    assert data.far_ood["news"][0]["prompt"].startswith("Review: usenet post")
    assert list(data.eval_splits("d")) == ["d", "news"] and len(data.ids["news"]) == 4
    no_text = _jsonl(tmp_path / "bad.jsonl", [{"body": "x"}] * 5)
    with pytest.raises(DataError, match="'text' column"):
        load_task_data(load_config(None, [f"data.task={path}", "data.shift_tasks=[]", "data.val_size=4",
                                          "data.test_size=4", f"data.far_ood_tasks=[{no_text}]"]).data)
    mc = _jsonl(tmp_path / "mc.jsonl", [{"question": f"q{i}?", "choices": ["x", "y"], "label": i % 2}
                                        for i in range(12)])
    with pytest.raises(DataError, match="multiple choice"):
        load_task_data(load_config(None, [f"data.task={mc}", "data.shift_tasks=[]", "data.val_size=4",
                                          "data.test_size=4", f"data.far_ood_tasks=[{far}]"]).data)


def test_shift_test_size_sizes_shift_and_far_ood_splits(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", ROWS)
    shift = _jsonl(tmp_path / "s.jsonl", ROWS)
    far = _jsonl(tmp_path / "news.jsonl", [{"text": f"usenet post {i}"} for i in range(10)])
    cfg = load_config(None, [f"data.task={path}", f"data.shift_tasks=[{shift}]", f"data.far_ood_tasks=[{far}]",
                             "data.val_size=4", "data.test_size=4", "data.shift_test_size=7",
                             "data.train_size=0"]).data
    data = load_task_data(cfg)
    assert len(data.test) == 4 and len(data.shifts["s"]) == 7 and len(data.far_ood["news"]) == 7
    assert len(load_task_data(cfg, test_limit=2).shifts["s"]) == 7  # fewer test rows, same shift rows


def test_multiple_choice_shifts_widen_the_run_to_their_most_options(tmp_path):
    four = _jsonl(tmp_path / "four.jsonl", [{"question": f"q{i}?", "choices": ["a", "b", "c", "d"], "label": i % 4}
                                            for i in range(12)])
    five = _jsonl(tmp_path / "five.jsonl", [{"question": f"s{i}?", "choices": list("abcde")[: 4 + i % 2],
                                             "label": i % 4} for i in range(12)])
    data = load_task_data(_cfg(four, shifts=[five], choice_scoring="likelihood"))
    assert data.spec.choices == (" A", " B", " C", " D", " E")
    assert set(data.test["num_choices"]) == {4} and set(data.shifts["five"]["num_choices"]) <= {4, 5}
    trained = load_task_data(_cfg(four, choice_scoring="likelihood")).spec  # an artifact trained without it
    assert trained.choices == (" A", " B", " C", " D")
    with pytest.raises(DataError, match="data.shift_tasks: .*no more options"):
        load_task_data(_cfg(four, shifts=[five], choice_scoring="likelihood"), spec=trained)
    assert load_task_data(_cfg(five, shifts=[four], choice_scoring="likelihood"), spec=data.spec).spec == data.spec


def test_a_multiple_choice_task_takes_other_multiple_choice_tasks_as_far_ood(tmp_path):
    task = _jsonl(tmp_path / "task.jsonl", [{"question": f"q{i}?", "choices": ["a", "b", "c"], "label": i % 3}
                                            for i in range(12)])
    other = _jsonl(tmp_path / "other.jsonl", [{"question": f"fill _ {i}", "choices": ["x", "y"], "label": i % 2}
                                              for i in range(9)])
    cfg = load_config(None, [f"data.task={task}", "data.shift_tasks=[]", f"data.far_ood_tasks=[{other}]",
                             "data.val_size=4", "data.test_size=4", "data.shift_test_size=5",
                             "data.choice_scoring=likelihood"]).data
    data = load_task_data(cfg)
    far = data.far_ood["other"]
    assert len(far) == 5 and set(far["num_choices"]) == {2} and far[0]["choices"] == [" x", " y"]
    assert far[0]["prompt"].startswith("Question: fill _") and data.ids["other"][0].startswith("other:")
    assert load_task_data(cfg).ids["other"] == data.ids["other"]  # seeded: the same rows every time
