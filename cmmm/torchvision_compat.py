"""Make ``import torchvision`` (and so ``import avalanche``) work beside a CPU-only torch.

PyPI has no CPU build of torchvision: its CUDA build beside a CPU torch fails at import with
``operator torchvision::nms does not exist`` because its compiled ops never register. Avalanche
and transformers import torchvision, so this would break them. We declare the two operator
schemas torchvision registers fake kernels for, and import again. Its detection ops stay
unusable; nothing here needs them. Only done when the plain import fails.
"""

from __future__ import annotations

import sys
import warnings

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
