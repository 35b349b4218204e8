"""Declared, validated strategy options.

A ``ConfigurableStrategy`` lists its options (``OPTIONS``: name -> ``Option`` with the published
default, type and admissible values). Unknown names raise ``ConfigError`` listing the valid ones,
values are type-checked, and ``options()`` returns every value used, so results.json records
the exact configuration. Every baseline uses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from cmmm.errors import ConfigError
from strategies.base import Strategy


@dataclass(frozen=True)
class Option:
    """One declared option: its default, its type and its admissible values."""

    default: Any
    kind: type
    help: str
    minimum: float | None = None
    choices: tuple[Any, ...] | None = None
    nullable: bool = False

    def parse(self, owner: str, name: str, raw: Any) -> Any:
        if raw is None or (self.nullable and raw in ("none", "None", "null")):
            if self.nullable:
                return None
            raise ConfigError(f"{owner}: option {name} needs a value ({self.help})")
        value: Any
        if self.kind is bool:
            if not isinstance(raw, bool):
                raise ConfigError(f"{owner}: option {name} must be true or false, got {raw!r}")
            value = raw
        elif self.kind is int:
            if isinstance(raw, bool) or not isinstance(raw, int | float) or raw != int(raw):
                raise ConfigError(f"{owner}: option {name} must be an integer, got {raw!r}")
            value = int(raw)
        elif self.kind is float:
            if isinstance(raw, bool) or not isinstance(raw, int | float):
                raise ConfigError(f"{owner}: option {name} must be a number, got {raw!r}")
            value = float(raw)
            if not math.isfinite(value):
                raise ConfigError(f"{owner}: option {name} must be finite, got {raw!r}")
        else:
            value = str(raw)
        if self.minimum is not None and value < self.minimum:
            raise ConfigError(f"{owner}: option {name} must be >= {self.minimum}, got {value}")
        if self.choices is not None and value not in self.choices:
            raise ConfigError(
                f"{owner}: option {name} must be one of {', '.join(map(str, self.choices))}, "
                f"got {value!r}"
            )
        return value


class ConfigurableStrategy(Strategy):
    """A strategy with declared options (``OPTIONS``); read values with ``self.opt(name)``."""

    family: ClassVar[str] = "baseline"
    OPTIONS: ClassVar[dict[str, Option]] = {}

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            valid = "; ".join(
                f"{name} (default {opt.default}: {opt.help})" for name, opt in self.OPTIONS.items()
            )
            raise ConfigError(
                f"{self.family}: unknown option(s) {', '.join(unknown)}; valid options: "
                f"{valid or 'none'}"
            )
        self._values = {
            name: opt.parse(self.family, name, options.get(name, opt.default))
            for name, opt in self.OPTIONS.items()
        }
        self.check()

    def check(self) -> None:
        """Cross-option validation; raise ``ConfigError``."""

    def opt(self, name: str) -> Any:
        return self._values[name]

    def options(self) -> dict[str, Any]:
        return dict(self._values)

    def option_help(self) -> dict[str, str]:
        return {name: opt.help for name, opt in self.OPTIONS.items()}
