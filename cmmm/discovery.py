"""Finding the plug-ins: the one place where the core imports ``strategies`` and ``streams``.

The core defines the contracts (``cmmm.strategy.STRATEGIES``, ``cmmm.data.catalog.STREAMS``);
strategies and streams register themselves in them when their module is imported.
``load_plugins`` imports every module of the ``strategies`` and ``streams`` packages (a package
scan, so a new file needs no list to be edited) and every entry point of the group
``cmmm.plugins``, so that another installed package can add its own strategy or stream::

    [project.entry-points."cmmm.plugins"]
    my_method = "my_package.my_method"

Discovering registries call it the first time they are read; it runs once per process.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

PLUGIN_PACKAGES = ("strategies", "streams")
ENTRY_POINT_GROUP = "cmmm.plugins"

# True from the moment loading starts: a plug-in reading a registry while it is being imported
# must not start a second, recursive load.
_loading_started = False


def load_plugins() -> None:
    """Import every built-in plug-in module and every ``cmmm.plugins`` entry point (once)."""
    global _loading_started
    if _loading_started:
        return
    _loading_started = True
    try:
        for package_name in PLUGIN_PACKAGES:
            package = importlib.import_module(package_name)
            for module in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
                importlib.import_module(f"{package_name}.{module.name}")
        for entry_point in entry_points(group=ENTRY_POINT_GROUP):
            entry_point.load()
    except BaseException:
        # A failed import (a broken user plug-in) is reported again on the next read rather than
        # leaving the registries silently half filled.
        _loading_started = False
        raise


def plugin_module(name: str) -> ModuleType:
    """The built-in plug-in module ``name`` (e.g. ``"streams.mosi"``), for the few core commands
    that drive one particular plug-in rather than a registry entry: ``cmmm data`` (a data set's own
    downloader and transcript encoder), the speed benchmark (ours' prompts) and the modality
    benchmark (the synthetic stream's defaults)."""
    if name.split(".")[0] not in PLUGIN_PACKAGES:
        raise ValueError(f"{name!r} is not a module of {' or '.join(PLUGIN_PACKAGES)}")
    return importlib.import_module(name)


def plugin_package_dirs() -> list[Path]:
    """The directories of the plug-in packages, as this process imports them (for Ray workers)."""
    return [
        Path(importlib.import_module(name).__file__ or "").resolve().parent
        for name in PLUGIN_PACKAGES
    ]
