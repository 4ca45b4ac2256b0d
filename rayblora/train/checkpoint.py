"""A member checkpoint directory (training core, no Ray): its file names and how its parts are read.

    adapter.safetensors   the adapter (LoRA) tensors at the checkpoint's step
    trainer_state.pt      optimizer / scheduler / stepper state, the state dict of every step hook, CPU RNG
                          (tensors and plain containers only: read with ``weights_only=True``)
    state.json            {"step": ..., "metrics": {...}[, "best": {"step": ..., "val_nll": ...}]}
    best_adapter.safetensors   with `train.keep_best`: the adapter of the lowest validation NLL so far

The loop (:mod:`rayblora.train.loop`) writes and restores whole checkpoints; families whose training hooks
collect statistics (SWAG moments, the hybrid adapter's variational state) read their hook's part through
:func:`read_hook_state`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

ADAPTER = "adapter.safetensors"
TRAINER_STATE = "trainer_state.pt"
STATE_JSON = "state.json"
BEST_ADAPTER = "best_adapter.safetensors"


def read_trainer_state(directory: str | Path) -> dict[str, Any]:
    """The trainer state blob of a member checkpoint (FileNotFoundError if `directory` is not one)."""
    path = Path(directory) / TRAINER_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {TRAINER_STATE}; not a member checkpoint")
    return torch.load(path, weights_only=True)


def read_hook_state(directory: str | Path, hook: str) -> dict[str, Any]:
    """The checkpointed state dict of the step hook named `hook` (its state's "hook" entry) in a member
    checkpoint's trainer state; KeyError naming the hook if the checkpoint has none."""
    for state in read_trainer_state(directory).get("hooks", []):
        if isinstance(state, dict) and state.get("hook") == hook:
            return state
    raise KeyError(f"{directory}: the checkpoint holds no state of the {hook!r} training hook")


def read_step_state(directory: str | Path) -> dict[str, Any]:
    """`state.json` of a member checkpoint: its step and the metrics reported with it."""
    return json.loads((Path(directory) / STATE_JSON).read_text())
