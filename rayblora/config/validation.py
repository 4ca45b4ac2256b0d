"""Validation helpers shared by every config section: one error type naming the dotted field."""

from __future__ import annotations

from typing import Any, Sequence


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names the field."""


def check(ok: bool, where: str, message: str) -> None:
    """Raise :class:`ConfigError` ``"<where>: <message>"`` unless `ok`."""
    if not ok:
        raise ConfigError(f"{where}: {message}")


def one_of(value: Any, allowed: Sequence[Any], where: str) -> None:
    """Raise :class:`ConfigError` unless `value` is one of `allowed` (the message lists them)."""
    check(value in allowed, where, f"must be one of {list(allowed)}, got {value!r}")
