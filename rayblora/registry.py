"""The posterior-family registry: a leaf table of method name -> "module:Class", resolved on demand.

Nothing here imports a family, so the config can validate `posterior.method` without loading torch models, and
a family module imports only what lies below it (docs/ARCHITECTURE.md). A new family adds one row to
:data:`BUILTIN` (or calls :func:`register` for a class defined elsewhere) and declares on its class what it needs
(`needs_data`, `post_hoc`, ...: :class:`rayblora.posteriors.base.Posterior`); the command line reads those
declarations (e.g. `rayblora fit --method` offers :func:`post_hoc_methods`). An unknown name fails with the list
of known ones.
"""

from __future__ import annotations

import importlib
from typing import Any

BUILTIN: dict[str, str] = {
    "map": "rayblora.posteriors.ensemble:MapPosterior",
    "ensemble": "rayblora.posteriors.ensemble:EnsemblePosterior",
    "laplace": "rayblora.posteriors.laplace.posterior:LaplacePosterior",
    "laplace_ensemble": "rayblora.posteriors.laplace.posterior:LaplaceEnsemblePosterior",
    "swa": "rayblora.posteriors.swag:SwaPosterior",
    "swag": "rayblora.posteriors.swag:SwagPosterior",
    "multiswag": "rayblora.posteriors.swag:MultiSwagPosterior",
    "mc_dropout": "rayblora.posteriors.baselines:McDropoutPosterior",
    "temperature": "rayblora.posteriors.baselines:TemperaturePosterior",
    "temperature_ensemble": "rayblora.posteriors.baselines:TemperatureEnsemblePosterior",
    "blob": "rayblora.posteriors.blob:BlobPosterior",
    "blob_mean": "rayblora.posteriors.blob:BlobMeanPosterior",
    "tfb": "rayblora.posteriors.tfb:TfbPosterior",
    "tfb_ensemble": "rayblora.posteriors.tfb:TfbEnsemblePosterior",
    "hybrid_vi": "rayblora.posteriors.hybrid.posterior:HybridVIPosterior",
}
"""The families shipped with rayblora."""

_TABLE: dict[str, str] = dict(BUILTIN)
_CLASSES: dict[str, Any] = {}


def register(cls: Any) -> Any:
    """Add a family class defined outside :data:`BUILTIN` under `cls.method` (usable as a decorator)."""
    name = getattr(cls, "method", "")
    if not name:
        raise ValueError(f"{cls.__name__} has no `method` name")
    target = f"{cls.__module__}:{cls.__qualname__}"
    if _TABLE.get(name, target) != target:
        raise ValueError(f"posterior method {name!r} is registered twice ({_TABLE[name]} and {target})")
    _TABLE[name] = target
    _CLASSES[name] = cls
    return cls


def available_methods() -> tuple[str, ...]:
    """Names of every registered posterior family, sorted."""
    return tuple(sorted(_TABLE))


def post_hoc_methods() -> tuple[str, ...]:
    """Names of the families `rayblora fit` builds onto trained members (their class's `post_hoc` is set),
    sorted; imports every family."""
    return tuple(m for m in available_methods() if getattr(get_posterior_class(m), "post_hoc", ""))


def get_posterior_class(method: str) -> Any:
    """The family class registered as `method`, imported on first use (KeyError naming the known methods)."""
    if method not in _TABLE:
        raise KeyError(f"unknown posterior method {method!r}; known methods: {list(available_methods())}")
    if method not in _CLASSES:
        module, _, name = _TABLE[method].partition(":")
        cls = getattr(importlib.import_module(module), name)
        if cls.method != method:
            raise RuntimeError(f"registry entry {method!r} -> {_TABLE[method]} has method {cls.method!r}")
        _CLASSES[method] = cls
    return _CLASSES[method]
