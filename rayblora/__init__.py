"""rayblora: Bayesian LoRA fine-tuning of LLMs (ensembles, SWAG, Laplace, hybrid adapters) orchestrated on Ray.

`import rayblora` stays light (no torch); :func:`load_posterior` resolves :mod:`rayblora.artifact` on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
_LAZY = {"load_posterior": "rayblora.artifact"}
"""Public names re-exported from modules that import torch and transformers (loaded on first access)."""


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rayblora' has no attribute {name!r}")


__all__ = ["__version__", "load_posterior"]
