"""A hyper-parameter search space over config fields, read from YAML and checked before any cluster work.

Each top-level key is a dotted config field; its value is a distribution (a one-key mapping) or a fixed value::

    adapter.rank: {choice: [4, 8, 16]}        # sampled uniformly from the list
    adapter.alpha: {grid: [8, 16]}            # every value (Tune grid search: multiplies the trials)
    train.lr: {loguniform: [1.0e-4, 3.0e-3]}  # log-uniform between the bounds
    train.weight_decay: {uniform: [0.0, 0.1]}
    train.steps: {randint: [40, 80]}          # integers, both bounds included
    data.max_length: 64                       # fixed for every trial

Every choice and both bounds of every range are built into a full :class:`~rayblora.config.Config` before the
sweep starts, so an unknown field or a bad value fails naming the field. Integer fields take only choice, grid,
randint or a fixed value.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence, get_type_hints

import yaml
from ray import tune

from rayblora.config import Config, ConfigError, config_from_dict

KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
SWEEP_OWNED = ("output.", "cluster.", "train.eval_every", "train.checkpoint_every")
"""Fields the sweep sets itself (trial directories, resources, report cadence): not searchable."""


@dataclass(frozen=True)
class Dimension:
    """One searched (or fixed) config field: `kind` is one of KINDS or "fixed"; `values` are the choices,
    the (low, high) bounds of a range, or the one fixed value."""

    field: str
    kind: str
    values: tuple[Any, ...]

    @property
    def searched(self) -> bool:
        return self.kind != "fixed"

    def corners(self) -> tuple[Any, ...]:
        """The values checked before the sweep: every choice, or both bounds of a range."""
        return self.values

    def domain(self) -> Any:
        """The Tune search-space domain of this dimension (the value itself when fixed)."""
        lo, hi = (self.values + (None, None))[:2]
        return {"fixed": lambda: self.values[0], "choice": lambda: tune.choice(list(self.values)),
                "grid": lambda: tune.grid_search(list(self.values)), "uniform": lambda: tune.uniform(lo, hi),
                "loguniform": lambda: tune.loguniform(lo, hi), "randint": lambda: tune.randint(lo, hi + 1),
                }[self.kind]()


def _field_hint(dotted: str) -> Any:
    """The declared type of a dotted config field (ConfigError naming it when unknown)."""
    section, _, name = dotted.partition(".")
    sections = get_type_hints(Config)
    if section not in sections or not name:
        raise ConfigError(f"{dotted}: not a config field (section.field); known sections: {sorted(sections)}")
    hints = get_type_hints(sections[section])
    if name not in hints:
        raise ConfigError(f"{dotted}: unknown field; known fields: {sorted(f.name for f in fields(sections[section]))}")
    return hints[name]


def _range(field: str, kind: str, bounds: Any) -> tuple[Any, ...]:
    ok = isinstance(bounds, (list, tuple)) and len(bounds) == 2 and all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) for b in bounds)
    if not ok or not bounds[0] < bounds[1] and not (kind == "randint" and bounds[0] == bounds[1]):
        raise ConfigError(f"{field}: {kind} needs [low, high] with finite numbers low < high, got {bounds!r}")
    if kind == "loguniform" and bounds[0] <= 0:
        raise ConfigError(f"{field}: loguniform needs low > 0, got {bounds!r}")
    if kind == "randint" and not all(float(b).is_integer() for b in bounds):
        raise ConfigError(f"{field}: randint needs integer bounds, got {bounds!r}")
    return tuple(int(b) for b in bounds) if kind == "randint" else tuple(float(b) for b in bounds)


def parse_dimension(field: str, spec: Any) -> Dimension:
    """One space entry: a one-key mapping {kind: values} or a fixed value."""
    if any(field == owned or field.startswith(owned) for owned in SWEEP_OWNED):
        raise ConfigError(f"{field}: set by the sweep itself (trial directories, resources, report cadence); "
                          "set it in the config instead of the search space")
    hint = _field_hint(field)
    if not isinstance(spec, dict):
        return Dimension(field, "fixed", (spec,))
    if len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(f"{field}: a distribution is a one-key mapping with a key in {list(KINDS)}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if hint is int and kind in ("uniform", "loguniform"):
        raise ConfigError(f"{field}: an integer field takes choice, grid, randint or a fixed value, not {kind}")
    if kind in ("choice", "grid"):
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"{field}: {kind} needs a non-empty list, got {values!r}")
        return Dimension(field, kind, tuple(values))
    return Dimension(field, kind, _range(field, kind, values))


def parse_space(values: Any, where: str = "search space") -> list[Dimension]:
    """Dimensions of a space given as a mapping of dotted fields (see the module docstring)."""
    if not isinstance(values, dict) or not values:
        raise ConfigError(f"{where}: must be a non-empty mapping of dotted config fields to distributions")
    return [parse_dimension(str(k), v) for k, v in values.items()]


def load_space(path: str | os.PathLike) -> list[Dimension]:
    """Read a search-space YAML file (ConfigError naming the file or the field)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"search space file not found: {p}")
    try:
        values = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    return parse_space(values, str(p))


def assign(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the nested config dict `base` with dotted fields set to `values`."""
    out = json.loads(json.dumps(base))
    for dotted, value in values.items():
        section, name = dotted.split(".", 1)
        out.setdefault(section, {})[name] = list(value) if isinstance(value, tuple) else value
    return out


def check_space(base: dict[str, Any], dims: Sequence[Dimension]) -> None:
    """Build a full Config for every choice and bound of every dimension (the others at their first corner);
    raises ConfigError naming the field of the first bad value."""
    first = {d.field: d.corners()[0] for d in dims}
    for dim in dims:
        for value in dim.corners():
            config_from_dict(assign(base, {**first, dim.field: value}))


def param_space(dims: Sequence[Dimension]) -> dict[str, dict[str, Any]]:
    """The Tune `param_space`: nested like the config ({"train": {"lr": tune.loguniform(...)}})."""
    out: dict[str, dict[str, Any]] = {}
    for dim in dims:
        section, name = dim.field.split(".", 1)
        out.setdefault(section, {})[name] = dim.domain()
    return out


def flatten(sampled: dict[str, Any]) -> dict[str, Any]:
    """A trial's sampled nested config ({"train": {"lr": 1e-3}}) as dotted fields ({"train.lr": 1e-3})."""
    return {f"{section}.{name}": value for section, inner in sampled.items() if isinstance(inner, dict)
            for name, value in inner.items()}


def space_digest(dims: Sequence[Dimension]) -> list[list[Any]]:
    """JSON-able description of a space (part of a sweep's identity on disk)."""
    return [[d.field, d.kind, list(d.values)] for d in dims]
