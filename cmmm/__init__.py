"""cmmm: continual learning when modalities go missing.

From Python: ``cmmm.run(...)`` trains and scores one configuration and returns its ``Results``;
``cmmm.load_results(run_dir)`` reads a finished run; ``cmmm.RunConfig`` is the configuration.
"""

from typing import Any

from cmmm.torchvision_compat import fix_torchvision_on_first_import

# torchmetrics, transformers and avalanche all import torchvision; on a CPU-only torch its
# import needs a fix that must come before any of them (see cmmm.torchvision_compat). It is
# applied at that first import, not here: importing cmmm stays free of torch.
fix_torchvision_on_first_import()

_API = {
    "run": "cmmm.api",
    "load_results": "cmmm.results",
    "find_results": "cmmm.results",
    "Results": "cmmm.results",
    "RunConfig": "cmmm.running",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    # Imported on first use: `cmmm --help` should not pay for torch and Avalanche.
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'cmmm' has no attribute {name!r}")
