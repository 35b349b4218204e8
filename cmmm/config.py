"""The one path from settings to a run: ``resolve``.

Settings come from flags, a TOML file, a finished run's ``results.json``, a mapping (an
experiment row, the Python API) or a ``RunConfig`` made in code. ``resolve`` turns any of them
into a ``ResolvedRun``: the complete configuration (every unset value filled from the stream's
defaults, then the paper's; every setting checked) and the strategy it names, built from its
options. ``cmmm run``, ``cmmm.run``, ``cmmm.running.run`` and the commands of many runs all go
through it, so a setting is parsed, filled and checked in one place, and an unknown strategy or
option fails before anything is loaded. The settings themselves, their defaults and the run key
are ``cmmm.run_config``'s.

This module imports no heavy library at import time: the command line's help reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmmm.config_files import read_config_file
from cmmm.errors import ConfigError
from cmmm.run_config import RunConfig, complete

if TYPE_CHECKING:
    from cmmm.strategy import Strategy


@dataclass(frozen=True)
class ResolvedRun:
    """A complete, checked configuration and its strategy, built once from its options.

    One run's: a strategy may keep what it built for that run, so a second run resolves again.
    """

    config: RunConfig
    strategy: Strategy


def resolve(source: Any = None, /, *, where: str | None = None, **overrides: Any) -> ResolvedRun:
    """The complete configuration of ``source`` with ``overrides`` (``RunConfig`` fields) on
    top, and its strategy.

    ``source``: a ``RunConfig``, a ``ResolvedRun`` (returned as it is when nothing overrides
    it), a mapping of ``RunConfig`` fields, a path to a TOML file or a results.json, or None
    (the defaults). ``where`` names the settings' source in error messages. Raises
    ``ConfigError`` for an unknown setting, strategy or option, or a value out of bounds.
    """
    if isinstance(source, ResolvedRun):
        if not overrides:
            return source
        source = source.config
    if isinstance(source, RunConfig):
        # A RunConfig made in code has not been checked yet; nor have its overrides.
        values: dict[str, Any] = asdict(source)
        where = where or "settings"
    elif isinstance(source, Mapping):
        values = dict(source)
        where = where or "settings"
    elif isinstance(source, str | Path):
        values = read_config_file(source)
        where = where or str(source)
    elif source is None:
        values = {}
        where = where or "settings"
    else:
        raise TypeError(
            f"settings must be a RunConfig, a mapping or a path, got {type(source).__name__}"
        )
    values.update(overrides)
    config = complete(RunConfig.from_mapping(values, where))
    return ResolvedRun(config, build_strategy(config))


def build_strategy(config: RunConfig) -> Strategy:
    """The strategy ``config`` names, built from its options (a ``ConfigError`` for an unknown
    name or option)."""
    from cmmm.strategy import STRATEGIES

    try:
        return STRATEGIES.get(config.strategy).factory(**config.strategy_options)
    except TypeError as error:  # a plug-in strategy whose __init__ takes no **options
        raise ConfigError(f"strategy {config.strategy}: {error}") from None
