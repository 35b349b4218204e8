"""The stream catalog: ``STREAMS``, the streams ``cmmm run --stream`` knows, by name.

A loader takes a ``StreamRequest`` (data directory, a cache directory it may write to, a logging
function, and the stream's own options) and returns a validated ``MultimodalDataset``;
``cmmm.data.missing_stream`` builds the missing-case stream from it. The loaders themselves are
plug-ins (``streams/``, or a package's ``cmmm.plugins`` entry point), found by
``cmmm.discovery.load_plugins`` the first time the catalog is read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmmm.data.dataset import MultimodalDataset
from cmmm.errors import ConfigError
from cmmm.registry import Registry


@dataclass(frozen=True)
class StreamRequest:
    data_dir: Path
    cache_dir: Path
    log: Callable[[str], None] = print
    options: Mapping[str, Any] = field(default_factory=dict)

    def take_options(self, allowed: set[str]) -> dict[str, Any]:
        unknown = sorted(set(self.options) - allowed)
        if unknown:
            raise ConfigError(
                f"unknown stream options {unknown}; this stream accepts {sorted(allowed)}"
            )
        return dict(self.options)


Loader = Callable[[StreamRequest], MultimodalDataset]
STREAMS: Registry[Loader] = Registry("stream", discover=True)
