"""`rayblora import`: LoRA adapters trained outside rayblora (plain PEFT folders, as HF Trainer, TRL, Axolotl or
LLaMA-Factory save them) as a verified `map` (one folder) or `ensemble` (several) artifact of the configured base
model and task, so that `fit` (Laplace, TFB), `evaluate`, `sweep prior`, `generate` and `serve` work on them as on
members rayblora trained. `rayblora export` is the way back: an artifact's members as plain PEFT folders, each
with a record of its base model's fingerprint that a later import checks.

Each folder's own rank, alpha (rsLoRA folded in), target modules and layers are taken from its files
(:func:`rayblora.model.read_peft_adapter`); folders of different configs are zero-padded into one
(:mod:`rayblora.workflows.padded_members`). Checked before anything is written: the base model the adapter names
against the configured one, every adapted module present in the base with the adapter's shapes, the task's
answer tokens (by building the scorer), and, where the folder records one (:data:`BASE_RECORD`, written by
`rayblora export`), the base model's fingerprint.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Callable, Sequence

from rayblora.config import Config
from rayblora.manifest import open_artifact, write_dir_atomic, write_json_atomic
from rayblora.model import PEFT_CONFIG, PEFT_WEIGHTS, ModelError, read_peft_adapter
from rayblora.workflows.padded_members import Candidate, pad_members, write_members

BASE_RECORD = "rayblora_base.json"
"""Beside an exported adapter: the base model's name and rayblora fingerprint (:func:`rayblora.model.
base_fingerprint`), and the artifact and member it came from. PEFT ignores the file; `rayblora import` checks it."""


def _base_name(name: str) -> str:
    """A base model's name as compared across hubs and caches: the last path part, lower case."""
    return Path(name.rstrip("/")).name.lower()


def check_base(recorded: str, cfg: Config, folder: Path, log: Callable[[str], None]) -> None:
    """Refuse an adapter that names another base model than the configured one (a folder or a known name)."""
    if not recorded:
        log(f"[import] {folder}: its adapter_config.json names no base model; checked by module shapes only")
        return
    if _base_name(recorded) != _base_name(cfg.model.name):
        raise ModelError(f"{folder}: trained on base model {recorded!r}, but model.name is {cfg.model.name!r}; "
                         "import it with the base model it was trained on")


def check_fingerprint(folder: Path, fingerprint: str) -> None:
    """Refuse an adapter whose :data:`BASE_RECORD` names another base model fingerprint than `fingerprint`."""
    record = folder / BASE_RECORD
    if not record.is_file():
        return
    try:
        want = json.loads(record.read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{record}: unreadable base model record ({exc!r}); delete it to import by name only"
                         ) from None
    if want != fingerprint:
        raise ModelError(f"{folder}: trained on a base model with fingerprint {want[:12]}…, but the configured "
                         f"model.name has fingerprint {fingerprint[:12]}… (same name, other weights or dtype); "
                         "import it with the base model it was trained on")


def import_adapters(folders: Sequence[str | Path], cfg: Config, out: str | Path | None = None,
                    log: Callable[[str], None] = print) -> Path:
    """Write the PEFT LoRA adapters in `folders` (in that order) as the artifact `<out>/posterior` (default
    `<output.dir>/posterior`) of `cfg`'s base model and task: `map` for one folder, `ensemble` for several."""
    if not folders:
        raise ModelError("import: name at least one adapter folder")
    candidates = []
    for folder in map(Path, folders):
        adapter, state, recorded = read_peft_adapter(folder)
        check_base(recorded, cfg, folder, log)
        candidates.append(Candidate(str(folder), dataclasses.replace(cfg, adapter=adapter), state,
                                    {"source": str(folder.resolve()), "base_model_name_or_path": recorded,
                                     "rank": adapter.rank, "alpha": adapter.alpha}))
    padded = pad_members(candidates, out or cfg.out_dir, log)
    for folder in map(Path, folders):
        check_fingerprint(folder, padded.scorer.fingerprint)
    path = write_members(padded, candidates, range(len(candidates)),
                         {"imported": [c.info["source"] for c in candidates]})
    log(f"[import] {len(candidates)} adapter(s) -> {path}")
    return path


def export_members(artifact: str | Path, out: str | Path, log: Callable[[str], None] = print) -> list[Path]:
    """Write every member of the artifact at `artifact` as a plain PEFT LoRA folder `<out>/member-<i>`
    (`adapter_config.json` + `adapter_model.safetensors`, loadable by `PeftModel.from_pretrained`) with its
    :data:`BASE_RECORD`. The artifact's checksums are verified first; `out` is written whole or not at all."""
    out = Path(out)
    opened = open_artifact(artifact)
    artifact, manifest = opened.root, opened.manifest
    if out.exists() and any(out.iterdir()):
        raise ModelError(f"export --out {out}: exists and is not empty; name a new folder")

    def fill(tmp: Path) -> None:
        for i, member in enumerate(manifest["members"]):
            folder = tmp / f"member-{i}"
            folder.mkdir()
            for name in (PEFT_CONFIG, PEFT_WEIGHTS):
                shutil.copy2(artifact / member["path"] / name, folder / name)
            write_json_atomic(folder / BASE_RECORD, {
                "base_model": manifest["base_model"]["name"], "fingerprint": manifest["base_model"]["fingerprint"],
                "artifact": str(artifact.resolve()), "method": manifest["method"], "member": i})

    write_dir_atomic(out, fill)
    folders = [out / f"member-{i}" for i in range(len(manifest["members"]))]
    log(f"[export] {len(folders)} member(s) of {artifact} ({manifest['method']}) -> {out}")
    return folders
