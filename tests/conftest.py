"""Shared fixtures: a learnable synthetic sentiment task, a tiny 2-layer Llama config, trained tiny members
(pure torch, no Ray), and one session-scoped local Ray."""

from __future__ import annotations

import json
import os
import random
import socket
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "600")  # Ray's 60 s is too short on a loaded machine

POSITIVE = ["good", "great", "lovely", "fine", "superb"]
NEGATIVE = ["bad", "awful", "poor", "dull", "weak"]
FILLER = ["the", "film", "was", "a", "plot", "and", "story", "actors"]


def write_sentiment_jsonl(path: Path, n: int, seed: int, noise: float = 0.1) -> Path:
    """`n` rows of {"text", "label"}: three sentiment words among filler words; `noise` of labels flipped."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            y = rng.randint(0, 1)
            words = rng.choices(POSITIVE if y else NEGATIVE, k=3) + rng.choices(FILLER, k=2)
            rng.shuffle(words)
            label = 1 - y if rng.random() < noise else y
            f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return path


def write_choice_jsonl(path: Path, n: int, seed: int, widths: tuple[int, ...] = (2, 3, 5)) -> Path:
    """`n` multiple-choice rows {"question", "choices", "label"}: pick the positive word (or phrase) among negative
    ones, the number of options cycling through `widths` (ragged rows)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            width = widths[i % len(widths)]
            options = rng.sample(NEGATIVE, width - 1)
            label = rng.randrange(width)
            options.insert(label, rng.choice(POSITIVE) + (" " + rng.choice(FILLER) if rng.random() < 0.5 else ""))
            question = "Which one is " + rng.choice(["good", "nice", "positive"]) + "? " + " ".join(
                rng.choices(FILLER, k=rng.randint(1, 4)))
            f.write(json.dumps({"question": question, "choices": options, "label": label}) + "\n")
    return path


@pytest.fixture(scope="session")
def choice_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("choice-data")
    return {"train": write_choice_jsonl(root / "train.jsonl", 300, seed=0),
            "shift": write_choice_jsonl(root / "shift.jsonl", 60, seed=1, widths=(4,))}


@pytest.fixture(scope="session")
def sentiment_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"train": write_sentiment_jsonl(root / "train.jsonl", 400, seed=0),
            "shift": write_sentiment_jsonl(root / "shift.jsonl", 120, seed=1, noise=0.3)}


def tiny_overrides(files: dict[str, Path], out_dir: Path, **extra: str) -> list[str]:
    """Dotted overrides for a seconds-long tiny run on the synthetic task."""
    values = {
        "model.name": "tiny-llama", "data.task": str(files["train"]),
        "data.shift_tasks": f"[{files['shift']}]", "data.train_size": "0", "data.val_size": "40",
        "data.test_size": "60", "data.max_length": "64",
        "data.prompt_template": "{text}\nSentiment:", "train.steps": "20", "train.lr": "5e-3",
        "train.batch_size": "16", "train.warmup_steps": "2", "train.torch_threads": "1",
        "posterior.members": "2", "cluster.num_cpus": "4", "output.dir": str(out_dir),
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture
def tiny_config(sentiment_files, tmp_path):
    from rayblora.config import load_config

    return load_config(None, tiny_overrides(sentiment_files, tmp_path / "run"))


@pytest.fixture(scope="session")
def tiny_session_config(sentiment_files, tmp_path_factory):
    from rayblora.config import load_config

    return load_config(None, tiny_overrides(sentiment_files, tmp_path_factory.mktemp("session-run")))


@pytest.fixture(scope="session")
def tiny_data(tiny_session_config):
    from rayblora.data import load_task_data

    return load_task_data(tiny_session_config.data)


@pytest.fixture(scope="session")
def trained_members(tiny_session_config, tiny_data):
    """Two tiny members trained in-process (no Ray): (scorer, [adapter states], [info])."""
    from rayblora.workflows.members import train_members_in_process

    scorer, members = train_members_in_process(tiny_session_config, log=lambda _m: None, data=tiny_data)
    return scorer, [m.adapter for m in members], [m.info() for m in members]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (logical CPUs so 2 members and a Serve replica fit)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=True, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_port(ray_session) -> int:
    """The HTTP port of the session's Ray Serve: it starts with the first application a module deploys and ends
    with the session's Ray; each module deletes the applications it deployed (a proxy started once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def delete_serve_apps(names, timeout_s: float = 300.0) -> None:
    """Delete the session Serve's applications `names` side by side (each replica's graceful stop overlaps the
    others') and wait until none is listed."""
    from ray import serve

    for name in names:
        serve.delete(name, _blocking=False)
    deadline = time.monotonic() + timeout_s
    while set(names) & set(serve.status().applications):
        assert time.monotonic() < deadline, f"Serve applications {names} still listed after {timeout_s} s"
        time.sleep(0.2)
