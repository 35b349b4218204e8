"""Instance gates from the other modalities: a channel-wise gate per modality, computed by that
modality's MLP from the mean pooled tokens of the other modalities present in the sample (AOEPT's
instance gate), and the presence-weighted mean it reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cmmm.kit.prompt_kit import PooledTokens


def gate_mlp(width: int, hidden: int) -> nn.Sequential:
    """d -> hidden -> d with a ReLU between: the logits of a channel-wise gate."""
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))


def present_mean(
    pooled: PooledTokens,
    present: Tensor,
    modalities: Sequence[str],
    indices: Sequence[int],
    layer: int,
) -> tuple[Tensor, Tensor]:
    """(B, d) mean of the pooled tokens at ``layer`` of the modalities ``indices`` that are present
    (``present``: (B, M) 0/1 floats), 0 where none is, and (B, 1) how many were present."""
    count = present[:, list(indices)].sum(dim=1, keepdim=True)
    summed = sum(present[:, j, None] * pooled[(modalities[j], layer)] for j in indices)
    return summed / count.clamp(min=1.0), count


def presence_gate(
    mlp: nn.Module, pooled: PooledTokens, presence: Tensor, modalities: Sequence[str], layer: int
) -> Tensor:
    """(B, d) sigmoid of ``mlp`` on the mean pooled tokens at ``layer`` of every present modality
    (AOEPT's gate of its shared prompt)."""
    present = (presence > 0.5).to(presence.dtype)
    fused, _ = present_mean(pooled, present, modalities, range(len(modalities)), layer)
    return torch.sigmoid(mlp(fused))


def instance_gates(
    mlps: Sequence[nn.Module],
    pooled: PooledTokens,
    presence: Tensor,
    modalities: Sequence[str],
    layers: Sequence[int],
) -> dict[tuple[str, int], Tensor]:
    """(modality, layer) -> (B, d) gates: sigmoid of the modality's MLP (``mlps[i]``) on the mean
    pooled tokens of the present other modalities; 1 for a sample with no other modality."""
    present = (presence > 0.5).to(presence.dtype)
    gates = {}
    for i, m in enumerate(modalities):
        others = [j for j in range(len(modalities)) if j != i]
        for layer in layers:
            source, count = present_mean(pooled, present, modalities, others, layer)
            gate = torch.sigmoid(mlps[i](source))
            gates[(m, layer)] = torch.where(count > 0, gate, torch.ones_like(gate))
    return gates
