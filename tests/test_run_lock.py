"""One writer per run directory: a second real `rayblora` process on a directory another process writes is
refused at once naming the holder, touching nothing; a lock whose holder died (or whose pid now belongs to
another process) is taken over with a log line; the lock is gone when the command ends, failed or not."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_overrides
from rayblora.workflows.run_lock import LOCK_FILE, RunDirectoryBusy, acquire, release, run_lock

ROOT = Path(__file__).resolve().parents[1]
DEADLINE = 600


def _rayblora(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rayblora.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=DEADLINE)


def _tree(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under `directory` but the lock: (size, mtime in ns)."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != LOCK_FILE}


def _holder(directory: Path) -> subprocess.Popen:
    """A real process holding the directory's lock until its stdin closes; returns once it holds it."""
    code = ("import sys; from rayblora.workflows.run_lock import run_lock\n"
            f"with run_lock({str(directory)!r}, 'rayblora train (the first run)'):\n"
            "    print('held', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"  # blocks until the lock is taken (or the process ends)
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(sentiment_files,
                                                                                             tmp_path, capsys):
    from rayblora.cli import main

    run = tmp_path / "run"
    train = ["train", "--in-process", *tiny_overrides(sentiment_files, run, **{"train.steps": "2",
                                                                                "posterior.members": "1"})]
    assert main(train) == 0  # the first run (and the third) in this process, the second a process of its own
    assert not (run / LOCK_FILE).exists()  # released when the command ended
    before = _tree(run)
    holder = _holder(run)
    try:
        second = _rayblora(*train)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"being written by pid {holder.pid} on {socket.gethostname()}" in second.stderr
        assert "rayblora train (the first run)" in second.stderr
        assert _tree(run) == before  # nothing of the first run touched
    finally:
        holder.kill()
        holder.wait(timeout=DEADLINE)
    assert (run / LOCK_FILE).is_file()  # SIGKILL: the holder had no chance to release it
    capsys.readouterr()
    assert main(train) == 0
    assert f"taking over the lock of pid {holder.pid}" in capsys.readouterr().out and not (run / LOCK_FILE).exists()


def test_a_failed_command_releases_its_lock_and_leaves_no_directory_it_created(tmp_path):
    run = tmp_path / "run"
    bad = _rayblora("evaluate", "--posterior", str(tmp_path / "nowhere"), "model.name=tiny-llama",
                    f"output.dir={run}", "data.task=movie")
    assert bad.returncode == 2 and "not a posterior artifact" in bad.stderr
    assert not run.exists()


def test_a_reused_pid_or_another_host_is_told_apart(tmp_path):
    record = acquire(tmp_path, "first", log=lambda _m: None)
    with pytest.raises(RunDirectoryBusy, match="being written by pid"):
        acquire(tmp_path, "second", log=lambda _m: None)
    lock = tmp_path / LOCK_FILE
    # this process's pid, but a start time that is not this process's: the pid was reused, the holder is gone
    lock.write_text(json.dumps({**record, "pid_start": "1", "token": "old"}))
    seen = []
    with run_lock(tmp_path, "third", log=seen.append):
        assert json.loads(lock.read_text())["command"] == "third"
    assert seen and "no longer runs" in seen[0] and not lock.exists()
    lock.write_text(json.dumps({**record, "host": "another-node", "token": "theirs"}))
    with pytest.raises(RunDirectoryBusy, match=f"remove {lock}"):
        acquire(tmp_path, "fourth", log=lambda _m: None)
    release(tmp_path, record)  # not ours any more: left in place
    assert json.loads(lock.read_text())["token"] == "theirs"


def test_an_interrupted_holder_releases_its_lock(tmp_path):
    holder = _holder(tmp_path)
    holder.send_signal(signal.SIGINT)  # KeyboardInterrupt unwinds the with block
    holder.wait(timeout=DEADLINE)
    assert not (tmp_path / LOCK_FILE).exists() and os.path.isdir(tmp_path)
