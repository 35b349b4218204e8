"""Each sample's missing pattern as an index into a list of patterns (``all_patterns``), read
from the presence mask on the device: a table from the presence bits (modality i = bit i) to the
pattern's index, so a batch mixing patterns needs no host loop or synchronisation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from cmmm.data.patterns import Pattern


def pattern_lookup(patterns: Sequence[Pattern], num_modalities: int) -> Tensor:
    """(2^M,) long: presence bits as a binary number -> index into ``patterns``; -1 for a
    combination that is not among them (every modality missing, for ``all_patterns``)."""
    lookup = torch.full((2**num_modalities,), -1, dtype=torch.long)
    for i, p in enumerate(patterns):
        lookup[sum(1 << b for b, present in enumerate(p) if present)] = i
    return lookup


def pattern_indices(lookup: Tensor, presence: Tensor, message: str) -> Tensor:
    """(B,) index of each sample's presence mask (B, M) in ``lookup``'s patterns; a sample whose
    pattern is not listed fails with ``message``."""
    bits = (presence > 0.5).long()
    powers = 2 ** torch.arange(bits.shape[1], device=bits.device)
    index = lookup.to(bits.device)[(bits * powers).sum(dim=1)]
    # Checked on the device: no host synchronisation inside a training step.
    torch._assert_async((index >= 0).all(), message)
    return index
