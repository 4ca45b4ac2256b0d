"""The artifact codec: save a Posterior as a directory in the format of :mod:`rayblora.manifest`, and load one
back (verifying schema, every checksum and the base model's fingerprint) as the family its manifest names.

Written atomically (temporary sibling directory + rename). Only JSON and safetensors are read: no pickle.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

import rayblora
from rayblora.config import AdapterConfig, ModelConfig
from rayblora.data.formats import TaskSpec
from rayblora.density import FeatureDensity
from rayblora.manifest import (MANIFEST, SCHEMA_VERSION, Artifact, ArtifactError, file_checksums, open_artifact,
                               read_manifest, write_dir_atomic, write_json_atomic)
from rayblora.model import set_lora_state
from rayblora.posteriors import Posterior
from rayblora.registry import get_posterior_class
from rayblora.scoring import AnswerScorer, build_scorer

DENSITY_FILE = "density.safetensors"
"""The members' feature density (:mod:`rayblora.density`), beside any family's own files; its manifest section is
`density` (threshold, quantile, how it was fitted). Artifacts without one load with `posterior.density = None`."""

__all__ = ["Artifact", "ArtifactError", "load_posterior", "open_artifact", "read_manifest", "save_derived",
           "save_posterior", "scorer_for_artifact"]


def _save_members(posterior, root: Path) -> list[dict[str, Any]]:
    scorer, entries = posterior.scorer, []
    with scorer.restoring_adapter():
        for i, (state, info) in enumerate(zip(posterior.members, posterior.member_info)):
            set_lora_state(scorer.model, state)
            scorer.model.save_pretrained(str(root / "members" / str(i)))
            entries.append({"path": f"members/{i}", **info})
    return entries


def save_posterior(posterior, path: str | os.PathLike, *, model_config: ModelConfig,
                   adapter_config: AdapterConfig, training: dict[str, Any] | None = None,
                   lineage: dict[str, Any] | None = None) -> Path:
    """Write `posterior` as an artifact directory at `path` (whole or not at all: an old one is replaced only by a
    complete new one, :func:`rayblora.manifest.write_dir_atomic`)."""
    def fill(tmp: Path) -> None:
        members = _save_members(posterior, tmp)
        files = dict(posterior.artifact_tensors())
        if posterior.density is not None:
            files[DENSITY_FILE] = posterior.density.tensors()
        for name, tensors in files.items():
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
            "lineage": lineage or {}, "files": file_checksums(tmp),
        }
        if posterior.density is not None:
            manifest["density"] = {"file": DENSITY_FILE, **posterior.density.extra()}
        write_json_atomic(tmp / MANIFEST, manifest)

    return write_dir_atomic(path, fill)


def _asdict(cfg) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _check_scorer(scorer, artifact: Artifact) -> None:
    manifest, root = artifact.manifest, artifact.root
    want = manifest["base_model"]["fingerprint"]
    if scorer.fingerprint != want:
        raise ArtifactError(f"{root}: trained on base model {manifest['base_model']['name']!r} with fingerprint "
                            f"{want[:12]}…, but the given base model has fingerprint {scorer.fingerprint[:12]}…; "
                            "load it with the base model it was trained on")
    if scorer.answer_ids.tolist() != manifest["task"]["answer_token_ids"]:
        raise ArtifactError(f"{root}: the tokenizer maps the answers {manifest['task']['choices']} to "
                            f"{scorer.answer_ids.tolist()}, the artifact expects "
                            f"{manifest['task']['answer_token_ids']}")


def artifact_configs(artifact: Artifact) -> tuple[ModelConfig, AdapterConfig]:
    """The base-model and adapter config sections an artifact was trained with."""
    def tuples(d: dict[str, Any]) -> dict[str, Any]:
        return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}

    manifest = artifact.manifest
    return ModelConfig(**tuples(manifest["base_model"]["config"])), AdapterConfig(**tuples(manifest["adapter"]))


def scorer_for_artifact(artifact: Artifact, base=None) -> AnswerScorer:
    """Build the AnswerScorer an artifact needs (loading its base model unless `base` = (model, tokenizer))."""
    model_cfg, adapter_cfg = artifact_configs(artifact)
    task = artifact.manifest["task"]
    return build_scorer(model_cfg, adapter_cfg, TaskSpec.from_dict(task), task["max_length"], base=base)


def save_derived(posterior: Posterior, parent: Artifact, path: str | os.PathLike,
                 lineage: dict[str, Any] | None = None) -> Path:
    """Write `posterior`, derived post hoc from the artifact `parent` (a Laplace fit, a swept prior precision),
    as a new artifact at `path`: the parent's model, adapter and training record, and a lineage naming the parent
    (:meth:`Artifact.lineage_entry`) plus `lineage`."""
    model_cfg, adapter_cfg = artifact_configs(parent)
    return save_posterior(posterior, path, model_config=model_cfg, adapter_config=adapter_cfg,
                          training=parent.training, lineage={**parent.lineage_entry(), **(lineage or {})})


def load_posterior(artifact: Artifact | str | os.PathLike, scorer=None, base=None, method: str | None = None):
    """Load a posterior artifact as the family its manifest names.

    Args:
        artifact: an :class:`Artifact` a flow opened, or a directory (opened here: manifest, checksums, tensors).
        scorer: an existing AnswerScorer to reuse (its base model must match the artifact's fingerprint).
        base: alternatively `(model, tokenizer)` of the base model to attach a fresh adapter slot to.
        method: view the artifact as another registered family built from the same members
            (e.g. "map" of an ensemble); default: the artifact's own method.
    """
    if not isinstance(artifact, Artifact):
        artifact = open_artifact(artifact)
    if scorer is None:
        scorer = scorer_for_artifact(artifact, base=base)
    _check_scorer(scorer, artifact)
    tensors = dict(artifact.tensors)
    density = tensors.pop(DENSITY_FILE, None)
    manifest = artifact.manifest
    full = get_posterior_class(artifact.method).from_artifact(scorer, artifact.members, artifact.member_info,
                                                              tensors, manifest.get("family", {}))
    if "density" in manifest:
        if density is None:
            raise ArtifactError(f"{artifact.root}: the manifest names a feature density but {DENSITY_FILE} is "
                                "missing")
        full.density = FeatureDensity.from_tensors(density, manifest["density"])
    return full.view(method) if method else full
