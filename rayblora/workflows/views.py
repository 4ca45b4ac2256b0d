"""Which families an opened artifact can be viewed as, checked before any model loads (evaluate, fit, generate).

A family built from an artifact's members (`Posterior.view`) may need what only its own training collected (SWAG
moments, BLoB's A variances, the hybrid adapter's variational parameters: :meth:`Posterior.view_refusal`), and a
generation task decodes only families whose samples are adapter states (`Posterior.generative`). A family the user
asked for by name that the artifact cannot build is an error naming it and why; one taken from a config's defaults
(`posterior.eval_methods`) is skipped with one log line.
"""

from __future__ import annotations

from typing import Callable, Sequence

from rayblora.config import ConfigError
from rayblora.manifest import Artifact
from rayblora.registry import available_methods, get_posterior_class


def view_refusal(artifact: Artifact, method: str, with_data: bool = True) -> str | None:
    """Why `artifact` cannot be viewed as the family `method` (by a flow that has the artifact's splits, or not:
    `with_data`); None where it can. ConfigError for an unknown name."""
    if method not in available_methods():
        raise ConfigError(f"unknown posterior method {method!r}; known methods: {list(available_methods())}")
    cls = get_posterior_class(method)
    if artifact.manifest["task"]["kind"] == "generation" and not cls.generative:
        return "its samples are not adapter states a decoder can run (a generation task)"
    if cls.needs_data and not with_data and method != artifact.method:
        return f"is fitted on the task's data (rayblora fit --method {method} first, then use that artifact)"
    return cls.view_refusal(artifact.method)


def buildable_methods(artifact: Artifact, requested: Sequence[str] | None, defaults: Sequence[str],
                      log: Callable[[str], None] = print, with_data: bool = True) -> list[str]:
    """`requested` (each must be buildable: ConfigError naming every one that is not, and why), or the `defaults`
    that are buildable (the others skipped, each with one log line)."""
    methods = list(requested or defaults)
    refused = {m: reason for m in methods if (reason := view_refusal(artifact, m, with_data)) is not None}
    if refused and requested:
        raise ConfigError(f"{artifact.root} is a {artifact.method!r} artifact: "
                          + "; ".join(f"{m} {reason}" for m, reason in refused.items()))
    for m, reason in refused.items():
        log(f"[evaluate] skipping {m}: {reason}")
    return [m for m in methods if m not in refused]
