"""The posterior artifact: a directory that is the contract between training, evaluation, Tune and Serve.

Layout::

    manifest.json          schema version, method, base model identity + fingerprint, task + answer token ids,
                           members, sha256 of every other file, training metrics, rayblora version
    members/<i>/           PEFT adapter folders (adapter_config.json + adapter_model.safetensors)
    <family>.safetensors   family tensors (e.g. swag.safetensors, laplace.safetensors)

Written atomically (temporary sibling directory + rename). Loading verifies the schema, every checksum and the
base model's fingerprint. Only JSON and safetensors are ever read: no pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import rayblora
from rayblora.config import AdapterConfig, ModelConfig
from rayblora.data.formats import TaskSpec

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ADAPTER_FILE = "adapter_model.safetensors"


class ArtifactError(RuntimeError):
    """A posterior directory is missing, corrupt, of another schema or for another base model."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, data: Any, allow_nan: bool = False) -> None:
    """Write JSON via a temporary file in the same directory and an atomic rename.

    NaN / inf are refused unless `allow_nan` (benchmark records may hold them; manifests never do)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, allow_nan=allow_nan))
    os.replace(tmp, path)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temporary directory into place, replacing any old one at `final`."""
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex}")
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _save_members(posterior, root: Path) -> list[dict[str, Any]]:
    scorer, entries = posterior.scorer, []
    from rayblora.model import set_lora_state

    with scorer.restoring_adapter():
        for i, (state, info) in enumerate(zip(posterior.members, posterior.member_info)):
            set_lora_state(scorer.model, state)
            scorer.model.save_pretrained(str(root / "members" / str(i)))
            entries.append({"path": f"members/{i}", **info})
    return entries


def _file_checksums(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def save_posterior(posterior, path: str | os.PathLike, *, model_config: ModelConfig,
                   adapter_config: AdapterConfig, training: dict[str, Any] | None = None,
                   lineage: dict[str, Any] | None = None) -> Path:
    """Write `posterior` as an artifact directory at `path` (atomically; an old one is replaced)."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex}")
    tmp.mkdir()
    try:
        members = _save_members(posterior, tmp)
        for name, tensors in posterior.artifact_tensors().items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / name))
        scorer = posterior.scorer
        manifest = {
            "schema_version": SCHEMA_VERSION, "rayblora_version": rayblora.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "method": posterior.method,
            "base_model": {"name": model_config.name, "config": _asdict(model_config),
                           "fingerprint": scorer.fingerprint},
            "adapter": _asdict(adapter_config),
            "task": {**scorer.spec.to_dict(), "answer_token_ids": scorer.answer_ids.tolist(),
                     "max_length": scorer.max_length},
            "members": members, "family": posterior.artifact_extra(), "training": training or {},
            "lineage": lineage or {}, "files": _file_checksums(tmp),
        }
        write_json_atomic(tmp / MANIFEST, manifest)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _asdict(cfg) -> dict[str, Any]:
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(cfg)))


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


def verify_files(root: Path, manifest: dict[str, Any]) -> None:
    """Check every listed file's sha256; raise ArtifactError naming the first missing or altered file."""
    for rel, expected in manifest.get("files", {}).items():
        p = root / rel
        if not p.is_file():
            raise ArtifactError(f"{root}: file {rel} listed in the manifest is missing")
        if sha256_file(p) != expected:
            raise ArtifactError(f"{root}: checksum mismatch for {rel}: the file was modified or corrupted")


def _check_scorer(scorer, manifest: dict[str, Any], root: Path) -> None:
    want = manifest["base_model"]["fingerprint"]
    if scorer.fingerprint != want:
        raise ArtifactError(f"{root}: trained on base model {manifest['base_model']['name']!r} with fingerprint "
                            f"{want[:12]}…, but the given base model has fingerprint {scorer.fingerprint[:12]}…; "
                            "load it with the base model it was trained on")
    if scorer.answer_ids.tolist() != manifest["task"]["answer_token_ids"]:
        raise ArtifactError(f"{root}: the tokenizer maps the answers {manifest['task']['choices']} to "
                            f"{scorer.answer_ids.tolist()}, the artifact expects "
                            f"{manifest['task']['answer_token_ids']}")


def scorer_for_manifest(manifest: dict[str, Any], base=None):
    """Build the AnswerScorer an artifact needs (loading its base model unless `base` = (model, tokenizer))."""
    from rayblora.scoring import build_scorer

    spec = TaskSpec.from_dict(manifest["task"])
    model_cfg = ModelConfig(**_tuples(manifest["base_model"]["config"]))
    adapter_cfg = AdapterConfig(**_tuples(manifest["adapter"]))
    return build_scorer(model_cfg, adapter_cfg, spec, manifest["task"]["max_length"], base=base)


def _tuples(d: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def load_posterior(path: str | os.PathLike, scorer=None, base=None, method: str | None = None):
    """Load and verify a posterior artifact.

    Args:
        path: the artifact directory.
        scorer: an existing AnswerScorer to reuse (its base model must match the artifact's fingerprint).
        base: alternatively `(model, tokenizer)` of the base model to attach a fresh adapter slot to.
        method: view the artifact as another registered family built from the same members
            (e.g. "map" of an ensemble); default: the artifact's own method.
    """
    from rayblora.posteriors import get_posterior_class

    root = Path(path)
    manifest = read_manifest(root)
    verify_files(root, manifest)
    if scorer is None:
        scorer = scorer_for_manifest(manifest, base=base)
    _check_scorer(scorer, manifest, root)
    members = [load_file(str(root / m["path"] / ADAPTER_FILE)) for m in manifest["members"]]
    info = [{k: v for k, v in m.items() if k != "path"} for m in manifest["members"]]
    tensors = {p.name: load_file(str(p)) for p in sorted(root.glob("*.safetensors"))}
    full = get_posterior_class(manifest["method"]).from_artifact(scorer, members, info, tensors,
                                                                  manifest.get("family", {}))
    return full.view(method) if method else full


def adapter_state_from_folder(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Adapter tensors of a PEFT adapter folder (safetensors only)."""
    p = Path(folder) / ADAPTER_FILE
    if not p.is_file():
        raise ArtifactError(f"{folder}: no {ADAPTER_FILE}")
    return load_file(str(p))
