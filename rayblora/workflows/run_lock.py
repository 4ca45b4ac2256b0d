"""One writer per run directory: every command that writes under a run directory (`output.dir` or its `--out`)
holds `<dir>/.rayblora-lock.json` while it runs.

The file is created with O_EXCL and names its holder: host, pid, the pid's start time (so a reused pid is not
mistaken for the holder), the command and when it started. A second writer is refused at once with a
:class:`RunDirectoryBusy` naming the holder, before it reads or writes anything else there. A lock whose holder is
gone (same host, and that pid no longer runs or is another process) is taken over with a log line: that is how a
resubmitted Ray job, whose first driver died, resumes. A holder on another host cannot be checked from here; the
message says which file to remove once that holder is known to be gone. Readers (serving, loading an artifact)
take no lock: artifacts are replaced atomically (:func:`rayblora.manifest.replace_dir`).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

LOCK_FILE = ".rayblora-lock.json"


class RunDirectoryBusy(RuntimeError):
    """Another live process writes this run directory."""


def _start_time(pid: int) -> str | None:
    """The kernel's start time of process `pid` (clock ticks since boot, /proc/<pid>/stat field 22), or None
    where /proc is not available."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the holder recorded in a lock (on this host) still runs: its pid exists and started when it did."""
    pid = int(holder.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    started = _start_time(pid)
    return started is None or holder.get("pid_start") in (None, started)


def _describe(holder: dict[str, Any]) -> str:
    return (f"pid {holder.get('pid')} on {holder.get('host')}, `{holder.get('command')}`, started "
            f"{holder.get('started')}")


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written by its creator, or damaged: held, never silently broken


def _create(path: Path, record: dict[str, Any]) -> bool:
    """Create the lock file holding `record`; False if one exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    return True


def _take_over(path: Path, stale: dict[str, Any]) -> None:
    """Move the stale lock aside, unless another process already replaced it (then put that one back)."""
    aside = path.with_name(f"{LOCK_FILE}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another taker moved it first
    if _read(aside) != stale:  # it was a fresh lock, not the stale one we read: restore it
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
    aside.unlink(missing_ok=True)


def acquire(directory: str | os.PathLike, command: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Take the lock of `directory` (created if missing) for `command`; returns the record written."""
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path, host = directory / LOCK_FILE, socket.gethostname()
    record = {"host": host, "pid": os.getpid(), "pid_start": _start_time(os.getpid()), "command": command,
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "token": uuid.uuid4().hex,
              "created_directory": created}
    for _ in range(20):
        if _create(path, record):
            return record
        holder = _read(path)
        if holder is None:
            continue  # released between our two looks
        if not holder:
            time.sleep(0.1)  # its creator is writing it
            continue
        if holder.get("host") == host and holder.get("pid") is not None and not _alive(holder):
            log(f"[lock] {directory}: taking over the lock of {_describe(holder)}, which no longer runs")
            _take_over(path, holder)
            continue
        where = "" if holder.get("host") == host else (
            f"; its host cannot be checked from {host}: remove {path} once that process is known to be gone")
        raise RunDirectoryBusy(f"run directory {directory} is being written by {_describe(holder)}; wait for it, "
                               f"or choose another output.dir / --out{where}")
    raise RunDirectoryBusy(f"run directory {directory}: could not take its lock {path} (it keeps changing hands)")


def release(directory: str | os.PathLike, record: dict[str, Any]) -> None:
    """Remove the lock of `directory` if it is still the one `record` took, and the directory too if the lock
    created it and the command left it empty (a command refused at once leaves no trace)."""
    directory = Path(directory)
    path = directory / LOCK_FILE
    if (_read(path) or {}).get("token") == record["token"]:
        path.unlink(missing_ok=True)
        if record.get("created_directory"):
            try:
                directory.rmdir()
            except OSError:
                pass  # not empty: the command wrote there


@contextmanager
def run_lock(directory: str | os.PathLike, command: str, log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the lock of `directory` for the block (:func:`acquire`, then :func:`release`)."""
    record = acquire(directory, command, log)
    try:
        yield
    finally:
        release(directory, record)
