"""The on-disk artifact format (foundations layer): file names, schema version, checksums and atomic writes.

A posterior directory::

    manifest.json          schema version, method, base model identity + fingerprint, task + answer token ids,
                           members, sha256 of every other file, training metrics, lineage, rayblora version
    members/<i>/           PEFT adapter folders (adapter_config.json + adapter_model.safetensors)
    <family>.safetensors   family tensors (e.g. swag.safetensors, laplace.safetensors)

This module reads and checks that format without knowing any posterior family; :mod:`rayblora.artifact` is the
codec that turns a Posterior into such a directory and back. Only JSON and safetensors are ever read: no pickle.
Every write goes to a temporary sibling that is then renamed into place.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ADAPTER_FILE = "adapter_model.safetensors"
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


class ArtifactError(RuntimeError):
    """A posterior directory is missing, corrupt, of another schema or for another base model."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: str | os.PathLike, write: Callable[[str], object], mode: int | None = None) -> None:
    """Call ``write(tmp_name)`` on a temporary file beside `path`, then rename it onto `path` (`mode`: its
    permission bits, e.g. 0o644; default: the temporary file's 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a UTF-8 text file through a temporary sibling and an atomic rename."""
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), mode=0o644)


def write_json_atomic(path: str | os.PathLike, data: Any, allow_nan: bool = False) -> None:
    """Write JSON through a temporary sibling and an atomic rename.

    NaN / inf are refused unless `allow_nan` (benchmark records may hold them; manifests never do)."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=allow_nan))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the kernel, libc or
    file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move a finished temporary directory into place, replacing any old one at `final`.

    The old and the new directory are exchanged in one step where the system can (a reader, e.g. a server
    loading the artifact, sees the old or the new one, never none); elsewhere the old one is moved aside first."""
    tmp, final = Path(tmp), Path(final)
    if final.exists() and _exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old directory
        return
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex}")
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_dir_atomic(final: str | os.PathLike, fill: Callable[[Path], object]) -> Path:
    """Build the directory `final` whole or not at all: `fill(tmp)` writes a temporary sibling, which then
    replaces `final` (:func:`replace_dir`). If anything fails on the way (a full disk, a lost permission), the
    temporary directory is removed, whatever was at `final` is left as it was, and an OSError becomes an
    ArtifactError saying what failed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex}")
    tmp.mkdir()
    try:
        fill(tmp)
        replace_dir(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ArtifactError(f"writing {final} failed ({exc.strerror or exc}: {exc.filename or tmp}); nothing was "
                            f"replaced: {'the previous one is unchanged' if final.exists() else 'it does not exist'}"
                            ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def file_checksums(root: str | os.PathLike, exclude: str = MANIFEST) -> dict[str, str]:
    """sha256 of every file under `root` by relative POSIX path, the file named `exclude` left out."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != exclude}


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an artifact, with its schema checked (no checksum verification)."""
    root = Path(path)
    mf = root / MANIFEST
    if not mf.is_file():
        raise ArtifactError(f"{root}: not a posterior artifact (no {MANIFEST})")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{mf}: not valid JSON ({exc})") from None
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ArtifactError(f"{root}: schema version {version!r} is not supported (this rayblora reads "
                            f"version {SCHEMA_VERSION})")
    return manifest


def verify_files(root: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Check every listed file's sha256; raise ArtifactError naming the first missing or altered file."""
    root = Path(root)
    for rel, expected in manifest.get("files", {}).items():
        p = root / rel
        if not p.is_file():
            raise ArtifactError(f"{root}: file {rel} listed in the manifest is missing")
        if sha256_file(p) != expected:
            raise ArtifactError(f"{root}: checksum mismatch for {rel}: the file was modified or corrupted")


def adapter_state_from_folder(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Adapter tensors of a PEFT adapter folder (safetensors only)."""
    p = Path(folder) / ADAPTER_FILE
    if not p.is_file():
        raise ArtifactError(f"{folder}: no {ADAPTER_FILE}")
    return load_file(str(p))


def member_states(root: str | os.PathLike, manifest: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
    """The adapter tensors of every member folder the manifest lists, in order."""
    return [adapter_state_from_folder(Path(root) / m["path"]) for m in manifest["members"]]


def parent_lineage(parent: str | os.PathLike) -> dict[str, Any]:
    """The lineage entries naming a parent artifact: its absolute path, method and manifest's sha256."""
    parent = Path(parent)
    return {"parent": str(parent.resolve()), "parent_method": read_manifest(parent)["method"],
            "parent_manifest_sha256": sha256_file(parent / MANIFEST)}
