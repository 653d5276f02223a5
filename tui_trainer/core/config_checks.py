"""The checks every config section's validate() uses: each failure is one ConfigError naming the key."""

from __future__ import annotations

import math
from typing import Any

from tui_trainer.core.errors import ConfigError


def finite(name: str, value: float) -> None:
    # TOML reads `inf`, `nan` and `1e400` (= inf) as floats; none is a usable setting
    if not math.isfinite(value):
        raise ConfigError(f"{name}: must be a finite number, got {value}")


def in_range(name: str, value: float, low: float, high: float, *, high_open: bool = False) -> None:
    finite(name, value)
    if value < low or value > high or (high_open and value == high):
        raise ConfigError(f"{name}: must be in [{low:g}, {high:g}{')' if high_open else ']'}, got {value:g}")


def positive(section: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ConfigError(f"{section}.{name}: must be > 0, got {value}")
