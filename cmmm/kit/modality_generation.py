"""Generation of a missing modality's sequence from a learnable prompt and the sequences of the
modalities that are present (MPLMM's generative prompts), in the modalities' raw feature spaces.

For a missing target m and the set S of modalities present in the sample, [G_m ; f_(s->m)(x_s)
for s in S] (concatenated along the sequence; G_m a learnable (P, D_m) prompt, f_(s->m) an MLP
map D_s -> D_m, Conv1d kernel 1 + GELU) goes through an MLP over the sequence dimension (Conv1d
over positions + GELU, one per target and set S) to give m's (L_m, D_m) sequence.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmmm.backbone import MulT
from cmmm.kit.prompt_kit import SitePrompts


class ModalityGenerators(SitePrompts):
    """Site prompts that also generate missing modalities: ``generative`` (G_m), ``cross_map``
    (f_(s->m)) and ``sequence_map`` (per target and set of present modalities), drawn in that
    order; ``param`` creates the prompts G_m."""

    def __init__(self, backbone: MulT, length: int, param: Callable[..., nn.Parameter]) -> None:
        super().__init__()
        layout = backbone.layout
        self.modalities = layout.modalities
        self.seq_len = dict(zip(self.modalities, layout.seq_lens, strict=True))
        self.dim = dict(zip(self.modalities, layout.feature_dims, strict=True))
        self.length = length
        mods = self.modalities
        self.generative = nn.ParameterDict({m: param(length, self.dim[m]) for m in mods})
        self.cross_map = nn.ModuleDict(
            {
                f"{s}_to_{m}": nn.Conv1d(self.dim[s], self.dim[m], kernel_size=1)
                for m in mods
                for s in mods
                if s != m
            }
        )
        self.sequence_map = nn.ModuleDict(
            {
                self.sequence_key(m, subset): nn.Conv1d(
                    length + sum(self.seq_len[s] for s in subset), self.seq_len[m], kernel_size=1
                )
                for m in mods
                for subset in self.subsets(m)
            }
        )

    def block(self, m: str) -> tuple[int, int]:
        """(L_m, D_m): the shape of modality m's sequence."""
        return self.seq_len[m], self.dim[m]

    def subsets(self, target: str) -> list[tuple[str, ...]]:
        """Every non-empty set of the other modalities, in layout order."""
        others = [m for m in self.modalities if m != target]
        return [s for n in range(1, len(others) + 1) for s in itertools.combinations(others, n)]

    @staticmethod
    def sequence_key(target: str, subset: tuple[str, ...]) -> str:
        return f"{target}_from_{'_'.join(subset)}"

    def generate(self, target: str, subset: tuple[str, ...], sources: dict[str, Tensor]) -> Tensor:
        """(B, L_t, D_t): [G_t ; f_(s->t)(x_s) ...] mapped over the sequence dimension."""
        batch = next(iter(sources.values())).shape[0]
        parts = [self.generative[target].unsqueeze(0).expand(batch, -1, -1)]
        for s in subset:
            mapped = F.gelu(self.cross_map[f"{s}_to_{target}"](sources[s].transpose(1, 2)))
            parts.append(mapped.transpose(1, 2))  # (B, L_s, D_t)
        sequence = torch.cat(parts, dim=1)  # (B, P + sum L_s, D_t): positions as channels
        return F.gelu(self.sequence_map[self.sequence_key(target, subset)](sequence))

    def complete(
        self,
        features: dict[str, Tensor],
        presence: Tensor,
        present_signal: Mapping[str, Tensor],
        missing_signal: Mapping[str, Tensor],
    ) -> dict[str, Tensor]:
        """Every modality's (B, L_m, D_m) block: generated + ``missing_signal[m]`` where m is
        missing (from the modalities present in that sample), x + ``present_signal[m]`` where
        it is present."""
        present = presence > 0.5
        completed = {}
        for i, m in enumerate(self.modalities):
            result = features[m] + present_signal[m]
            missing = ~present[:, i]
            if bool(missing.any()):
                for subset in self.subsets(m):
                    rows = missing.clone()
                    for j, s in enumerate(self.modalities):
                        if s != m:
                            rows &= present[:, j] if s in subset else ~present[:, j]
                    index = rows.nonzero().squeeze(1)
                    if len(index) == 0:
                        continue
                    generated = self.generate(m, subset, {s: features[s][index] for s in subset})
                    result = result.index_copy(0, index, generated + missing_signal[m])
            completed[m] = result
        return completed
