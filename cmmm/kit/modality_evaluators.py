"""Per-modality evaluators: for each modality m, a small MLP that predicts, from the other
modalities a sample has, how much the frozen pre-trained backbone's output would move if m were
removed. Its targets are pseudo-labels of the frozen backbone itself: its output on the sample as
given against its output with m dropped (``output_shift``), on the training samples where m is
present together with another modality. A method uses the prediction to decide how much to rely
on a stand-in for a missing modality (ProMMA's missing modality evaluator).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmmm.backbone import MulT
from cmmm.kit.prompt_kit import frozen_output


def output_shift(full: Tensor, dropped: Tensor, regression: bool) -> Tensor:
    """(B,) in [0, 1]: how far the frozen model's output moves from its pseudo-label ``full``
    (its output on the sample as given, (B, out)) to ``dropped`` (with one modality removed):
    |y - y'| / (|y| + |y'|) for regression, the softmaxes' total-variation distance otherwise."""
    if regression:
        a, b = full[:, 0], dropped[:, 0]
        return (a - b).abs() / (a.abs() + b.abs()).clamp(min=1e-6)
    return 0.5 * (full.softmax(dim=1) - dropped.softmax(dim=1)).abs().sum(dim=1)


def evaluate_modalities(
    evaluators: ModalityEvaluators | None, pooled: Tensor, presence: Tensor
) -> tuple[Tensor | None, Tensor]:
    """The evaluators' (B, M) logits (None without evaluators) and the (B, M) scales
    ``ModalityEvaluators.scales`` makes of them."""
    logits = None if evaluators is None else evaluators.logits(pooled, presence)
    return logits, ModalityEvaluators.scales(presence, logits)


class ModalityEvaluators(nn.ModuleList):
    """One MLP d -> d -> 1 per modality (layout order), on the mean pooled inputs of the present
    other modalities. A ``ModuleList``, so its owner's state_dict keys are those of a plain list
    of ``nn.Sequential``."""

    def __init__(self, width: int, count: int) -> None:
        super().__init__(
            nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))
            for _ in range(count)
        )

    def logits(self, pooled: Tensor, presence: Tensor) -> Tensor:
        """(B, M) logits of each modality's evaluation, from ``pooled`` (B, M, d) inputs and the
        (B, M) presence mask."""
        present = (presence > 0.5).to(pooled.dtype)  # (B, M)
        logits = []
        for i, evaluator in enumerate(self):
            others = present.clone()
            others[:, i] = 0.0
            mean = (others[:, :, None] * pooled).sum(dim=1) / others.sum(1, keepdim=True).clamp(
                min=1.0
            )
            logits.append(evaluator(mean)[:, 0])
        return torch.stack(logits, dim=1)

    @staticmethod
    def scales(presence: Tensor, logits: Tensor | None) -> Tensor:
        """(B, M): 1 where the modality is present, its detached evaluation sigmoid(logit) where
        it is missing; 1 everywhere without evaluators (``logits`` None)."""
        present = (presence > 0.5).to(presence.dtype)
        if logits is None:
            return torch.ones_like(present)
        return present + (1.0 - present) * torch.sigmoid(logits.detach())

    @staticmethod
    def loss(backbone: MulT, x: Tensor, logits: Tensor | None, presence: Tensor) -> Tensor | None:
        """BCE of the evaluators' ``logits`` against the frozen model's pseudo-label targets, over
        the samples where the modality is present with at least one other; None if there is
        none or there are no evaluators (``logits`` None). Costs one prompt-free frozen pass plus
        one per modality with such samples."""
        if logits is None:
            return None
        layout = backbone.layout
        features, _ = layout.unpack(x)
        present = presence > 0.5
        eligible = present & (present.sum(dim=1, keepdim=True) >= 2)
        if not bool(eligible.any()):
            return None
        full = frozen_output(backbone, x)
        regression = backbone.config.output_dim == 1
        terms = []
        for i in range(len(layout.modalities)):
            rows = eligible[:, i]
            if not bool(rows.any()):
                continue
            dropped_presence = presence[rows].clone()
            dropped_presence[:, i] = 0.0
            dropped = layout.pack({m: f[rows] for m, f in features.items()}, dropped_presence)
            target = output_shift(full[rows], frozen_output(backbone, dropped), regression)
            terms.append(F.binary_cross_entropy_with_logits(logits[rows, i], target))
        return torch.stack(terms).mean()
