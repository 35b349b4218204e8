"""Contrastive losses between paired rows (AOEPT's auxiliary prompt-to-modality InfoNCE)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def info_nce(prompts: Tensor, features: Tensor, log_scale: Tensor) -> Tensor:
    """Cross-entropy of cosine logits (times exp(log_scale)) between matching rows of
    ``prompts`` and ``features`` (B, d) against every other row of the batch."""
    logits = F.normalize(prompts, dim=1) @ F.normalize(features, dim=1).T * log_scale.exp()
    return F.cross_entropy(logits, torch.arange(len(prompts), device=prompts.device))
