"""cmmm: continual learning when modalities go missing."""

from cmmm.torchvision_compat import ensure_torchvision_importable

# torchmetrics, transformers and avalanche all import torchvision; on a CPU-only torch its
# import needs a fix that must come before any of them (see cmmm.torchvision_compat).
ensure_torchvision_importable()
