"""The whole run configuration and its loading: :class:`Config` (one frozen dataclass per section), YAML files,
dotted command-line overrides coerced to each field's declared type, and YAML output.

A bad value raises :class:`ConfigError` naming the dotted field and the allowed values, before any Ray or model
work starts::

    cfg = load_config("jobs/configs/tiny.yaml", ["train.steps=5", "posterior.members=2"])
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence, get_type_hints

import yaml

from rayblora.config.deploy import ClusterConfig, OutputConfig, ServeConfig
from rayblora.config.sections import (AdapterConfig, BlobConfig, DataConfig, HybridConfig, LaplaceConfig, ModelConfig,
                                      PosteriorConfig, SamplingConfig, SwagConfig, TfbConfig, TrainConfig)
from rayblora.config.validation import ConfigError, check


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The frozen base model."""
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    """The LoRA adapter trained on top of it."""
    data: DataConfig = field(default_factory=DataConfig)
    """Task, splits and prompt."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation of one member."""
    posterior: PosteriorConfig = field(default_factory=PosteriorConfig)
    """Which posterior family to build and evaluate."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Prediction-time draws of mc_dropout, TFB and BLoB."""
    swag: SwagConfig = field(default_factory=SwagConfig)
    """SWAG / MultiSWAG collection and sampling."""
    laplace: LaplaceConfig = field(default_factory=LaplaceConfig)
    """Laplace-LoRA curvature, prior and predictive."""
    blob: BlobConfig = field(default_factory=BlobConfig)
    """BLoB (blob, blob_mean): the variational A factors."""
    tfb: TfbConfig = field(default_factory=TfbConfig)
    """Training-free Bayesianization (tfb, tfb_ensemble): the σ search."""
    hybrid: HybridConfig = field(default_factory=HybridConfig)
    """Bayesian hybrid adapter (hybrid_vi) and dynamic fine-tuning rounds."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Ray resources."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Where results go."""
    serve: ServeConfig = field(default_factory=ServeConfig)
    """The HTTP prediction endpoint (Ray Serve)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), the form that travels to Ray workers."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @property
    def out_dir(self) -> Path:
        return Path(self.output.dir)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert a YAML/override value to the field's declared type."""
    text = str(hint)
    if text.startswith("tuple"):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if value.strip() else []
        check(isinstance(value, (list, tuple)), where, f"must be a list, got {value!r}")
        inner = int if "int" in text else str
        try:
            return tuple(inner(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: every item must be {inner.__name__}, got {value!r}") from None
    if hint is bool or text == "bool":
        if isinstance(value, str):
            check(value.lower() in ("true", "false", "1", "0"), where, f"must be true/false, got {value!r}")
            return value.lower() in ("true", "1")
        check(isinstance(value, bool), where, f"must be true/false, got {value!r}")
        return value
    for kind in (int, float, str):
        if hint is kind or text == kind.__name__:
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ConfigError(f"{where}: must be an integer, got {value!r}")
            try:
                return kind(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: must be {kind.__name__}, got {value!r}") from None
    return value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    check(isinstance(values, dict), prefix.rstrip(".") or "config",
           f"must be a mapping, got {type(values).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    check(not unknown, f"{prefix}{unknown[0]}" if unknown else prefix,
           f"unknown field; known fields: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        where = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, f"{where}.")
        else:
            kwargs[name] = _coerce(value, hint, where)
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    """A YAML scalar or flow list from an override's right-hand side (e.g. `[q_proj, v_proj]`)."""
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def apply_overrides(values: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `section.field=value` overrides (YAML scalars/lists) to a nested dict, returning a copy."""
    out = json.loads(json.dumps(values))
    for item in overrides:
        check("=" in item, item, "override must look like section.field=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        check(len(parts) == 2, key, "override key must be section.field (e.g. train.steps=50)")
        section, name = parts
        sections = {f.name for f in fields(Config)}
        check(section in sections, key, f"unknown section; known sections: {sorted(sections)}")
        section_cls = get_type_hints(Config)[section]
        hint = get_type_hints(section_cls).get(name)
        out.setdefault(section, {})[name] = raw if hint is str else _parse_scalar(raw)
    return out


def config_from_dict(values: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a nested dict (raises ConfigError)."""
    return _build(Config, values or {}, "")


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (or the defaults when `path` is None) and apply dotted overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    return config_from_dict(apply_overrides(values, overrides))


def dump_config(cfg: Config) -> str:
    """YAML text of a config (loadable by :func:`load_config`)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
