"""The packed sample layout: one flat float32 tensor per sample.

Avalanche strategies (replay buffers, EWC, GEM, DER, ...) assume that a sample is
``(x, y, task_label)`` with one tensor ``x``. A tuple of modality tensors breaks them, so every
sample is packed into one vector by a fixed layout::

    x = [ m_1 flattened (L_1 * D_1) | m_2 flattened | ... | m_M flattened | presence (M) ]

Each modality block is its (L_m, D_m) sequence in row-major order; a missing modality's block is
all zeros and its presence flag is 0.0 (present: 1.0). The model unpacks with the same layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cmmm.errors import DataError


@dataclass(frozen=True)
class PackedLayout:
    modalities: tuple[str, ...]
    seq_lens: tuple[int, ...]
    feature_dims: tuple[int, ...]

    @property
    def block_sizes(self) -> tuple[int, ...]:
        return tuple(n * d for n, d in zip(self.seq_lens, self.feature_dims, strict=True))

    @property
    def size(self) -> int:
        return sum(self.block_sizes) + len(self.modalities)

    def pack(self, features: dict[str, torch.Tensor], presence: torch.Tensor) -> torch.Tensor:
        """Pack per-modality (B, L, D) tensors and a (B, M) presence mask into (B, size).

        Missing modalities are zero-filled here, whatever the input held, so a pattern can never
        leak the data it hides.
        """
        blocks = []
        for i, m in enumerate(self.modalities):
            x = features[m]
            expected = (self.seq_lens[i], self.feature_dims[i])
            if tuple(x.shape[1:]) != expected:
                raise DataError(
                    f"{m}: expected per-sample shape {expected}, got {tuple(x.shape[1:])}"
                )
            keep = presence[:, i].to(x.dtype).view(-1, 1, 1)
            blocks.append((x * keep).reshape(x.shape[0], -1))
        blocks.append(presence.to(torch.float32))
        return torch.cat(blocks, dim=1).to(torch.float32)

    def unpack(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Inverse of ``pack``: per-modality (B, L, D) tensors and the (B, M) presence mask."""
        if x.dim() != 2 or x.shape[1] != self.size:
            raise DataError(
                f"packed input must have shape (B, {self.size}) for layout "
                f"{self.describe()}, got {tuple(x.shape)}"
            )
        parts = torch.split(x, [*self.block_sizes, len(self.modalities)], dim=1)
        features = {
            m: parts[i].reshape(x.shape[0], self.seq_lens[i], self.feature_dims[i])
            for i, m in enumerate(self.modalities)
        }
        return features, parts[-1]

    def describe(self) -> str:
        return (
            " | ".join(
                f"{m} {n}x{d}"
                for m, n, d in zip(self.modalities, self.seq_lens, self.feature_dims, strict=True)
            )
            + f" | presence {len(self.modalities)}"
        )
