"""Posterior families behind one interface, registered by name.

Each family lives in its own module and is registered here explicitly; an unknown name fails with the list
of known ones.
"""

from __future__ import annotations

from rayblora.posteriors.base import Posterior

_REGISTRY: dict[str, type[Posterior]] = {}


def register(cls: type[Posterior]) -> type[Posterior]:
    """Add a family to the registry under `cls.method`."""
    if not cls.method:
        raise ValueError(f"{cls.__name__} has no `method` name")
    if cls.method in _REGISTRY and _REGISTRY[cls.method] is not cls:
        raise ValueError(f"posterior method {cls.method!r} is registered twice")
    _REGISTRY[cls.method] = cls
    return cls


def available_methods() -> tuple[str, ...]:
    """Names of every registered posterior family."""
    return tuple(sorted(_REGISTRY))


def get_posterior_class(method: str) -> type[Posterior]:
    """The family registered as `method` (KeyError naming the known methods otherwise)."""
    try:
        return _REGISTRY[method]
    except KeyError:
        raise KeyError(f"unknown posterior method {method!r}; known methods: {list(available_methods())}") \
            from None


def _register_builtin() -> None:
    from rayblora.posteriors.ensemble import EnsemblePosterior, MapPosterior
    from rayblora.posteriors.hybrid import HybridVIPosterior
    from rayblora.posteriors.laplace import LaplaceEnsemblePosterior, LaplacePosterior
    from rayblora.posteriors.baselines import McDropoutPosterior, TemperaturePosterior
    from rayblora.posteriors.swag import MultiSwagPosterior, SwagPosterior, SwaPosterior

    for cls in (MapPosterior, EnsemblePosterior, LaplacePosterior, LaplaceEnsemblePosterior,
                SwaPosterior, SwagPosterior, MultiSwagPosterior, McDropoutPosterior, TemperaturePosterior,
                HybridVIPosterior):
        register(cls)


_register_builtin()

__all__ = ["Posterior", "available_methods", "get_posterior_class", "register"]
