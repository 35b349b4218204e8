"""Run configurations as files.

``cmmm run --config FILE`` reads a TOML file of ``RunConfig`` fields (or a finished run's
``results.json``, whose ``config`` is the fully resolved configuration, to repeat that run);
``cmmm run --dry-run`` prints the resolved configuration in the same TOML, so that::

    cmmm run --stream mosi --strategy ours --dry-run > ours.toml
    cmmm run --config ours.toml --seed 1

round-trips. The nested settings (``strategy_options``, ``stream_options``,
``backbone_options``) are TOML tables. TOML has no null: a setting whose value is None is left
out, which is what None means (the default) for every such setting.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cmmm.errors import ConfigError
from cmmm.run_config import RunConfig

# A run's settings fit in a few kilobytes; a results.json with its history in well under this.
MAX_CONFIG_BYTES = 16 * 2**20


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The ``RunConfig`` values a TOML file or a ``results.json`` holds (unknown keys refused)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"{path}: a config file of {path.stat().st_size} bytes is not a run's settings "
                f"(at most {MAX_CONFIG_BYTES}); give the TOML file or the results.json"
            )
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(
            f"{path}: cannot read the config file ({error.strerror or error})"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(
            f"{path}: not a text file (not UTF-8); give a TOML file of run settings or a "
            "finished run's results.json"
        ) from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: not valid JSON ({error})") from None
        except RecursionError:
            raise ConfigError(f"{path}: JSON nested too deeply to be run settings") from None
        # A finished run's results.json: repeat exactly the configuration it ran.
        values = data.get("config", data) if isinstance(data, dict) else None
    else:
        try:
            values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: not valid TOML ({error})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a table of run settings")
    RunConfig.from_mapping(values, str(path))  # refuses unknown keys, naming the file
    return values


def _toml_value(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a valid TOML basic string (same escapes, \\uXXXX included).
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v, where) for v in value if v is not None) + "]"
    if isinstance(value, Mapping):
        items = [
            f"{_toml_key(k)} = {_toml_value(v, where)}" for k, v in value.items() if v is not None
        ]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    raise ConfigError(f"{where}: cannot write {value!r} ({type(value).__name__}) to TOML")


def _toml_key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "").isalnum() and key.isascii()
    return key if bare else json.dumps(key)


def config_to_toml(config: RunConfig, header: str = "") -> str:
    """The configuration as TOML that ``read_config_file`` reads back to an equal config."""
    values = asdict(config)
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    tables = {k: v for k, v in values.items() if isinstance(v, Mapping)}
    for key, value in values.items():
        if key in tables:
            continue
        if value is None:
            lines.append(f"# {key}: not set (its default)")
            continue
        lines.append(f"{_toml_key(key)} = {_toml_value(value, key)}")
    for key, table in tables.items():
        lines.append("")
        lines.append(f"[{key}]")
        for name, value in table.items():
            if value is None:
                lines.append(f"# {name}: none")
                continue
            lines.append(f"{_toml_key(name)} = {_toml_value(value, f'{key}.{name}')}")
    return "\n".join(lines) + "\n"
