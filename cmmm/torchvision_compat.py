"""Make ``import torchvision`` (and so ``import avalanche``) work beside a CPU-only torch.

PyPI has no CPU build of torchvision: its CUDA build beside a CPU torch fails at import with
``operator torchvision::nms does not exist`` because its compiled ops never register. Avalanche
and transformers import torchvision, so this would break them. We declare the two operator
schemas torchvision registers fake kernels for, and import again. Its detection ops stay
unusable; nothing here needs them. Only done when the plain import fails.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

_OPERATOR_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # keeps the torch.library fragment alive for the process lifetime


def ensure_torchvision_importable() -> None:
    global _library
    # Avalanche's qpsolvers import warns about GEM's optional solver at every start.
    warnings.filterwarnings("ignore", message="no QP solver found", category=UserWarning)
    try:
        import torchvision  # noqa: F401

        return
    except ModuleNotFoundError:
        return  # not installed: whoever needs it will say so
    except RuntimeError as error:
        if "torchvision::nms" not in str(error):
            raise
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    import torch

    _library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _OPERATOR_SCHEMAS:
        _library.define(schema)
    import torchvision  # noqa: F401,F811


class _AlreadyImported(importlib.abc.Loader):
    """Hands the import system the module ``ensure_torchvision_importable`` just imported."""

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return sys.modules[spec.name]

    def exec_module(self, module: ModuleType) -> None:
        pass


class _FixOnFirstImport(importlib.abc.MetaPathFinder):
    """Applies the fix when something first imports torchvision, so that importing cmmm (and
    ``cmmm --help``) never pays for torch and torchvision."""

    def find_spec(self, name: str, path: object, target: object = None) -> object:
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        ensure_torchvision_importable()
        if "torchvision" not in sys.modules:
            return None  # not installed: the normal finders say so
        return importlib.util.spec_from_loader(name, _AlreadyImported())


def fix_torchvision_on_first_import() -> None:
    """Arrange for ``ensure_torchvision_importable`` to run at the first ``import torchvision``
    (by Avalanche, torchmetrics or transformers), or now if it was imported already."""
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(finder, _FixOnFirstImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _FixOnFirstImport())
