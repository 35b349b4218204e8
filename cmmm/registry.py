"""Name -> factory registries for streams and strategies.

Adding a stream or a strategy is one file that calls ``register`` on the right registry; the CLI,
``cmmm list`` and the runner find it by name. A registry made with ``discover=True`` (the
strategies', the streams') loads the plug-ins (``cmmm.discovery.load_plugins``) the first time it
is read, so its entries are there wherever it is first needed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from cmmm.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    factory: T
    description: str
    # Values this entry recommends for run settings the user did not set (e.g. epochs).
    defaults: Mapping[str, Any] = field(default_factory=dict)
    # The entry's own options (name -> "default: what it does"), shown by `cmmm list`.
    options: Mapping[str, str] = field(default_factory=dict)


class Registry(Generic[T]):
    def __init__(self, kind: str, *, discover: bool = False) -> None:
        self.kind = kind
        self.discover = discover
        self._entries: dict[str, Entry[T]] = {}

    def _filled(self) -> dict[str, Entry[T]]:
        """The entries, after the plug-ins registered theirs (for a discovering registry)."""
        if self.discover:
            from cmmm.discovery import load_plugins

            load_plugins()
        return self._entries

    def register(
        self,
        name: str,
        description: str,
        *,
        options: Mapping[str, str] | None = None,
        **defaults: Any,
    ) -> Callable[[T], T]:
        def decorator(factory: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, factory, description, defaults, options or {})
            return factory

        return decorator

    def get(self, name: str) -> Entry[T]:
        try:
            return self._filled()[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; valid names: {', '.join(sorted(self._entries))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._filled())

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries[n] for n in self.names())

    def __contains__(self, name: object) -> bool:
        return name in self._filled()
