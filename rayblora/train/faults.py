"""Fault injection and a step probe for the fault-tolerance tests (pure Python, no Ray).

Driven by optional keys of a member's `train_loop_config`, which only tests set (through
`rayblora.workflows.coordinator.train_members(cfg, extra=...)` or `rayblora.workflows.train.train(cfg, extra=...)`); a
production run carries none of them and gets no hooks:

- ``probe_dir``: every worker appends one JSON line per optimizer step it executes to
  ``<probe_dir>/member<i>.jsonl``: ``{"step", "rank", "pid", "node"}``. A restarted worker is a new process, so
  the pids tell the attempts apart and the steps show where it resumed.
- ``pause_member`` / ``pause_step``: on its first attempt only, rank 0 of that member writes
  ``<probe_dir>/paused-member<i>.json`` (``{"step", "pid", "node"}``) after executing step ``pause_step`` and
  waits (``pause_timeout_s``, default 300 s) to be killed from outside: SIGKILL of that pid, or removal of its
  node. The file's existence marks the first attempt as spent, so the restarted worker trains on.
- ``fail_members``: member indices whose every attempt raises :class:`InjectedFailure` before training, i.e.
  members that fail for good once Ray Train's retries (`cluster.max_failures`) are used up.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable


class InjectedFailure(RuntimeError):
    """The failure a test asked for (`fail_members`)."""


def probe_path(probe_dir: str | os.PathLike, member: int) -> Path:
    """The step log of member `member` under `probe_dir`."""
    return Path(probe_dir) / f"member{member}.jsonl"


def pause_path(probe_dir: str | os.PathLike, member: int) -> Path:
    """The file member `member` writes when it pauses to be killed."""
    return Path(probe_dir) / f"paused-member{member}.json"


def read_probe(probe_dir: str | os.PathLike, member: int) -> list[dict[str, Any]]:
    """The steps member `member`'s workers executed, in execution order (empty if none)."""
    path = probe_path(probe_dir, member)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_pause(probe_dir: str | os.PathLike, member: int, timeout_s: float = 300.0,
                   gave_up: Callable[[], bool] = lambda: False) -> dict[str, Any]:
    """Block until member `member` has paused (returns its ``{"step", "pid", "node"}``).

    Raises TimeoutError after `timeout_s`, or RuntimeError as soon as `gave_up()` is true (e.g. the training
    call already returned, so the pause will never come).
    """
    path, deadline = pause_path(probe_dir, member), time.monotonic() + timeout_s
    while not path.exists():
        if gave_up():
            raise RuntimeError(f"member {member} never paused: training ended first")
        if time.monotonic() > deadline:
            raise TimeoutError(f"member {member} did not pause within {timeout_s:.0f} s")
        time.sleep(0.1)
    return json.loads(path.read_text())


class StepProbe:
    """A step hook (see `rayblora.train.loop.StepHook`) that logs executed steps and pauses once if asked.

    It carries no training state: `state_dict()` is empty, so checkpoints and resumes are unaffected.
    """

    def __init__(self, config: dict[str, Any], member: int, rank: int, node: str):
        self.dir = Path(config["probe_dir"])
        self.dir.mkdir(parents=True, exist_ok=True)
        self.member, self.rank, self.node = member, rank, node
        pausing = config.get("pause_member") == member and rank == 0
        self.pause_step = int(config["pause_step"]) if pausing else None
        self.pause_timeout_s = float(config.get("pause_timeout_s", 300))

    def __call__(self, step: int, scorer) -> None:
        record = {"step": step, "rank": self.rank, "pid": os.getpid(), "node": self.node}
        with open(probe_path(self.dir, self.member), "a") as f:
            f.write(json.dumps(record) + "\n")
        if step == self.pause_step:
            self._pause_once(record)

    def _pause_once(self, record: dict[str, Any]) -> None:
        marker = pause_path(self.dir, self.member)
        if marker.exists():  # the first attempt already paused: this is the restarted worker
            return
        tmp = marker.with_name(marker.name + ".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, marker)
        deadline = time.monotonic() + self.pause_timeout_s
        while time.monotonic() < deadline:  # the test kills this process (or its node) meanwhile
            time.sleep(0.1)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""


def injected_hooks(config: dict[str, Any], member: int, rank: int, node: str) -> list[StepProbe]:
    """The step hooks a test asked for in `config` (none in production runs).

    Raises InjectedFailure at once when `member` is one of `config["fail_members"]`.
    """
    if member in config.get("fail_members", ()):
        raise InjectedFailure(f"member {member}: injected permanent failure (fail_members)")
    return [StepProbe(config, member, rank, node)] if config.get("probe_dir") else []
