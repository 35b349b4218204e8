"""Declared, validated strategy options.

A ``ConfigurableStrategy`` lists its options (``OPTIONS``: name -> ``Option`` with the published
default, type and admissible values). Unknown names raise ``ConfigError`` listing the valid ones,
values are type-checked, and ``options()`` returns every value used, so results.json records
the exact configuration. Every baseline uses it. ``options_dataclass`` makes a dataclass of
values from such a declaration (the method's ``OursOptions``), so that no option is declared twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from cmmm.errors import ConfigError
from cmmm.strategy import Strategy

T = TypeVar("T")


def parse_layers(owner: str, name: str, raw: Any) -> tuple[int, ...]:
    """A layer list option: "0,1", "[0, 1]", "2" (or what JSON decoding made of them)."""
    text = str(raw).strip().strip("[]()").strip()
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise ConfigError(f"{owner}: option {name} names no layer, got {raw!r}")
    try:
        layers = [int(item) for item in items]
    except ValueError:
        raise ConfigError(
            f"{owner}: option {name} must be a comma list of layer indices, got {raw!r}"
        ) from None
    if any(layer < 0 for layer in layers) or len(set(layers)) != len(layers):
        raise ConfigError(f"{owner}: option {name} must list distinct layers >= 0, got {raw!r}")
    return tuple(sorted(layers))


def parse_layers_or_auto(owner: str, name: str, raw: Any) -> list[int] | None:
    """A layer list option that may also be "auto" (None: the strategy computes the layers)."""
    if isinstance(raw, str) and raw.strip().lower() == "auto":
        return None
    return list(parse_layers(owner, name, raw))


def parse_layers_or_all(owner: str, name: str, raw: Any) -> tuple[int, ...] | None:
    """A layer list option that may also be "all" (None: every layer the owner has)."""
    text = str(raw).strip()
    if text.lower() == "all":
        return None
    return parse_layers(owner, name, text)


def parse_comma_list(owner: str, name: str, raw: Any) -> str:
    """A list option kept as a comma string: accepts a JSON list of strings or a comma string."""
    if isinstance(raw, list | tuple) and all(isinstance(s, str) for s in raw):
        return ",".join(s.strip() for s in raw)
    if isinstance(raw, str):
        return raw.strip()
    raise ConfigError(f"{owner}: option {name} must be a comma list, got {raw!r}")


# Integer options are sizes (prompt lengths, pool sizes, buffer sizes, layers): bounded before
# anything is allocated. Prompt tokens join every attention, whose memory grows with their
# square; other sizes only linearly.
MAX_PROMPT_LENGTH = 1024
MAX_INTEGER_OPTION = 1_000_000


def _default_maximum(name: str, value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return MAX_PROMPT_LENGTH if "length" in name else MAX_INTEGER_OPTION


@dataclass(frozen=True)
class Option:
    """One declared option: its default, its type and its admissible values.

    ``parser`` (owner, name, raw) -> value replaces the checks of ``kind`` for values that are not
    a plain bool, int, float or string (layer lists, comma lists); ``minimum`` and ``choices``
    still apply to what it returns."""

    default: Any
    kind: type
    help: str
    minimum: float | None = None
    # None: the default bound of an integer option (``_default_maximum``).
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None
    nullable: bool = False
    parser: Callable[[str, str, Any], Any] | None = None

    def parse(self, owner: str, name: str, raw: Any) -> Any:
        if raw is None or (self.nullable and raw in ("none", "None", "null")):
            if self.nullable:
                return None
            raise ConfigError(f"{owner}: option {name} needs a value ({self.help})")
        value: Any
        if self.parser is not None:
            value = self.parser(owner, name, raw)
        elif self.kind is bool:
            # "true"/"false" as text too: config files and sweeps sometimes quote them
            if isinstance(raw, str) and raw.strip().lower() in ("true", "false"):
                raw = raw.strip().lower() == "true"
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
        maximum = self.maximum if self.maximum is not None else _default_maximum(name, value)
        if maximum is not None and value is not None and value > maximum:
            raise ConfigError(
                f"{owner}: option {name} must be <= {maximum}, got {value}: larger sizes would "
                "not fit in memory"
            )
        if self.minimum is not None and value is not None and value < self.minimum:
            raise ConfigError(f"{owner}: option {name} must be >= {self.minimum}, got {value}")
        if self.choices is not None and value not in self.choices:
            raise ConfigError(
                f"{owner}: option {name} must be one of {', '.join(map(str, self.choices))}, "
                f"got {value!r}"
            )
        return value


def options_dataclass(options: Mapping[str, Option]) -> Callable[[type[T]], type[T]]:
    """A class decorator: the class becomes a dataclass with one field per option of
    ``options``, in its order, typed by the option's kind and defaulting to its default, so that
    every option is declared once (in ``options``) rather than again as a field."""

    def decorate(cls: type[T]) -> type[T]:
        cls.__annotations__ = {
            name: option.kind | None if option.nullable else option.kind
            for name, option in options.items()
        }
        for name, option in options.items():
            setattr(cls, name, option.default)
        return dataclass(cls)

    return decorate


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
