"""What ``cmmm list`` prints, kept in ``listing.json`` so that listing never imports torch.

The strategies and streams are modules that import torch (about two seconds); their names,
descriptions, options and defaults change only with the code. ``python -m cmmm.listing`` writes
the file from the live registries, and ``tests/test_cmmm/test_cli/test_startup.py`` fails when
the file and the registries disagree, so the file cannot go stale unnoticed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cmmm.errors import ConfigError

LISTING_FILE = Path(__file__).with_name("listing.json")

# (name, description, option -> text) per entry.
Entry = tuple[str, str, dict[str, str]]


def live_listing() -> dict[str, list[Entry]]:
    """Every registered strategy and stream, from the registries themselves (imports torch)."""
    from cmmm.data.catalog import STREAMS
    from cmmm.discovery import load_plugins
    from cmmm.run_config import PAPER_DEFAULTS
    from cmmm.strategy import STRATEGIES

    load_plugins()

    strategies: list[Entry] = []
    for entry in STRATEGIES:
        strategy = entry.factory()
        values, helps = strategy.options(), strategy.option_help()
        options = {
            name: f"{value!r}" + (f"  {helps[name]}" if name in helps else "")
            for name, value in values.items()
        }
        strategies.append((entry.name, entry.description, options))
    streams: list[Entry] = []
    for entry in STREAMS:
        defaults = ", ".join(f"{k} {v}" for k, v in {**PAPER_DEFAULTS, **entry.defaults}.items())
        description = f"{entry.description} [defaults: {defaults}]"
        streams.append((entry.name, description, dict(entry.options)))
    return {"strategies": strategies, "streams": streams}


def stored_listing() -> dict[str, list[Entry]]:
    """The listing as last written by ``python -m cmmm.listing``."""
    try:
        raw: Any = json.loads(LISTING_FILE.read_text(encoding="utf-8"))
        return {
            kind: [
                (str(n), str(d), {str(k): str(v) for k, v in o.items()}) for n, d, o in raw[kind]
            ]
            for kind in ("strategies", "streams")
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ConfigError(
            f"{LISTING_FILE} is missing or damaged ({type(error).__name__}); "
            "rewrite it with `python -m cmmm.listing`"
        ) from None


def write_listing() -> None:
    from cmmm.atomic_files import atomic_write_text

    atomic_write_text(LISTING_FILE, json.dumps(live_listing(), indent=1) + "\n")


if __name__ == "__main__":
    write_listing()
    print(f"wrote {LISTING_FILE}")
