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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load as safetensors_load

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
    """The manifest of an artifact, with its schema checked (no checksum verification): a light look at an
    artifact (what it is, whether it is finished) that no flow then reads further; a flow opens it once with
    :func:`open_artifact`."""
    return _parse_manifest(Path(path), _manifest_bytes(Path(path)))


def _manifest_bytes(root: Path) -> bytes:
    mf = root / MANIFEST
    if not mf.is_file():
        raise ArtifactError(f"{root}: not a posterior artifact (no {MANIFEST})")
    return mf.read_bytes()


def _parse_manifest(root: Path, raw: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{root / MANIFEST}: not valid JSON ({exc})") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != SCHEMA_VERSION:
        raise ArtifactError(f"{root}: schema version {version!r} is not supported (this rayblora reads "
                            f"version {SCHEMA_VERSION})")
    return manifest


@dataclass(frozen=True)
class Artifact:
    """An artifact directory read once, at the front door of a flow (fit, evaluate, the prior sweep, serving,
    export), and passed down as a value: its manifest parsed, every listed file read once with its sha256 checked,
    the members' adapter tensors and the family's root-level safetensors files loaded from those same bytes."""

    root: Path
    """The directory, absolute."""
    manifest: dict[str, Any]
    manifest_sha256: str
    members: list[dict[str, torch.Tensor]]
    """Each member folder's adapter tensors, in manifest order."""
    tensors: dict[str, dict[str, torch.Tensor]]
    """The root-level safetensors files (family tensors, the feature density): file name -> tensors."""

    @property
    def method(self) -> str:
        return self.manifest["method"]

    @property
    def member_info(self) -> list[dict[str, Any]]:
        """Each member's manifest record without its folder path (seed, training metrics)."""
        return [{k: v for k, v in m.items() if k != "path"} for m in self.manifest["members"]]

    @property
    def training(self) -> dict[str, Any]:
        """The training record (config, splits, metrics); empty for an artifact without one."""
        return self.manifest.get("training", {})

    def lineage_entry(self) -> dict[str, Any]:
        """The lineage entries naming this artifact as the parent of another."""
        return _lineage_entry(self.root, self.method, self.manifest_sha256)


def open_artifact(path: str | os.PathLike) -> Artifact:
    """Read the artifact at `path` once (:class:`Artifact`); ArtifactError naming the first missing or altered file."""
    root = Path(path).resolve()
    raw = _manifest_bytes(root)
    manifest = _parse_manifest(root, raw)
    adapter_files = {f"{m['path']}/{ADAPTER_FILE}": i for i, m in enumerate(manifest["members"])}
    members: list[dict[str, torch.Tensor] | None] = [None] * len(adapter_files)
    tensors = {}
    for rel, expected in manifest.get("files", {}).items():
        data = _verified_bytes(root, rel, expected)
        if rel in adapter_files:
            members[adapter_files[rel]] = safetensors_load(data)
        elif "/" not in rel and rel.endswith(".safetensors"):
            tensors[rel] = safetensors_load(data)
    missing = [i for i, m in enumerate(members) if m is None]
    if missing:
        raise ArtifactError(f"{root}: member {missing[0]}'s {ADAPTER_FILE} is not listed in the manifest")
    return Artifact(root, manifest, hashlib.sha256(raw).hexdigest(), members, tensors)  # type: ignore[arg-type]


def _verified_bytes(root: Path, rel: str, expected: str) -> bytes:
    p = root / rel
    if not p.is_file():
        raise ArtifactError(f"{root}: file {rel} listed in the manifest is missing")
    data = p.read_bytes()
    if hashlib.sha256(data).hexdigest() != expected:
        raise ArtifactError(f"{root}: checksum mismatch for {rel}: the file was modified or corrupted")
    return data


def parent_lineage(parent: str | os.PathLike) -> dict[str, Any]:
    """The lineage entries naming the artifact at `parent` (its manifest read once): see
    :meth:`Artifact.lineage_entry`, for a flow that has only the path (the rounds of dynamic fine-tuning)."""
    root = Path(parent).resolve()
    raw = _manifest_bytes(root)
    return _lineage_entry(root, _parse_manifest(root, raw)["method"], hashlib.sha256(raw).hexdigest())


def _lineage_entry(root: Path, method: str, manifest_sha256: str) -> dict[str, Any]:
    return {"parent": str(root), "parent_method": method, "parent_manifest_sha256": manifest_sha256}
