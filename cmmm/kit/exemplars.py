"""Exemplar memories in a frozen feature space: herding selection, the features of a data set
batch by batch, the L2-normalised class means of stored exemplars, and a model that predicts by
the nearest of those means (iCaRL's nearest-mean-of-exemplars classifier, through Avalanche's
``NCMClassifier``).

A model here exposes ``features(x)``: its pooled features, where exemplars and class means live.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader


class NearestMeanOfExemplars(nn.Module):
    """MulT trained through its head; in eval mode, optionally the nearest exemplar class mean."""

    def __init__(self, backbone: nn.Module, use_ncm: bool) -> None:
        super().__init__()
        from avalanche.models import NCMClassifier

        self.backbone = backbone
        self.use_ncm = use_ncm
        self.ncm = NCMClassifier(normalize=True)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Any:
        # Avalanche's NCMClassifier registers its class_means buffer as None until it has means,
        # so a fresh model would refuse a state holding them ("unexpected key"); NCM's own loader
        # takes them (and rebuilds its class -> mean table) first.
        means = state_dict.get("ncm.class_means")
        if means is not None and self.ncm.class_means is None:
            self.ncm.load_state_dict({"class_means": means})
        return super().load_state_dict(state_dict, strict)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not self.use_ncm or self.ncm.class_means is None:
            return self.backbone(x)
        # (B, C) negative distances: the evaluator's argmax is the nearest mean.
        return self.ncm(self.features(x))


def herding_order(features: torch.Tensor, count: int) -> list[int]:
    """iCaRL's herding: indices whose running mean best approximates the mean feature."""
    normalised = F.normalize(features, dim=1)
    target = normalised.mean(dim=0)
    chosen: list[int] = []
    running = torch.zeros_like(target)
    available = torch.ones(len(normalised), dtype=torch.bool)
    for k in range(1, min(count, len(normalised)) + 1):
        distances = torch.linalg.vector_norm(target - (running + normalised) / k, dim=1)
        distances[~available] = float("inf")
        best = int(torch.argmin(distances))
        chosen.append(best)
        available[best] = False
        running += normalised[best]
    return chosen


@torch.no_grad()
def dataset_features(
    model: Any, dataset: Any, batch_size: int, device: Any
) -> tuple[torch.Tensor, ...]:
    """(features, targets, task labels) of an Avalanche data set in its order, in eval form
    (no augmentation), computed batch by batch by ``model.features``; on the CPU."""
    feats, targets, tasks = [], [], []
    for batch in DataLoader(dataset.eval(), batch_size=batch_size, shuffle=False):
        feats.append(model.features(batch[0].to(device)).cpu())
        targets.append(torch.as_tensor(batch[1]))
        tasks.append(torch.as_tensor(batch[-1]))
    return torch.cat(feats), torch.cat(targets), torch.cat(tasks)


def exemplar_class_means(
    model: Any, groups: Iterable[Any], batch_size: int, device: Any
) -> dict[int, torch.Tensor]:
    """Class -> the L2-normalised mean of the L2-normalised features of every exemplar of that
    class, pooled over the exemplar data sets ``groups``; on ``device``."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    for exemplars in groups:
        if len(exemplars) == 0:
            continue
        features, targets, _ = dataset_features(model, exemplars, batch_size, device)
        normalised = F.normalize(features, dim=1)
        for cls in targets.unique().tolist():
            rows = normalised[targets == cls]
            sums[cls] = sums.get(cls, 0) + rows.sum(dim=0)
            counts[cls] = counts.get(cls, 0) + len(rows)
    return {int(c): F.normalize(sums[c] / counts[c], dim=0).to(device) for c in sums}
