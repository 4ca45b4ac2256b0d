"""`rayblora import`: LoRA adapters trained outside rayblora (plain PEFT folders, as HF Trainer, TRL, Axolotl or
LLaMA-Factory save them) as a verified `map` (one folder) or `ensemble` (several) artifact of the configured base
model and task, so that `fit` (Laplace, TFB), `evaluate`, `sweep prior`, `generate` and `serve` work on them as on
members rayblora trained.

Each folder's own rank, alpha (rsLoRA folded in), target modules and layers are taken from its files
(:func:`rayblora.model.read_peft_adapter`); folders of different configs are zero-padded into one
(:mod:`rayblora.workflows.padded_members`). Checked before anything is written: the base model the adapter names
against the configured one, every adapted module present in the base with the adapter's shapes, the task's
answer tokens (by building the scorer).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

from rayblora.config import Config
from rayblora.model import ModelError, read_peft_adapter
from rayblora.workflows.padded_members import Candidate, pad_members, write_members


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
    path = write_members(padded, candidates, range(len(candidates)),
                         {"imported": [c.info["source"] for c in candidates]})
    log(f"[import] {len(candidates)} adapter(s) -> {path}")
    return path
