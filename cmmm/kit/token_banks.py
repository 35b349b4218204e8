"""Frozen K-means banks of each modality's pooled site tokens, and attention over them (AOEPT's
modal-contextualised prompts: learnable queries that read a bank of what a modality looks like).

A modality m's tokens at cross-modal layer l are ``cmmm.kit.prompt_kit``'s site tokens, mean-pooled
over time and averaged over the M-1 cross-modal transformers whose source is m
(``pooled_site_tokens``). ``ModalityBanks`` keeps, per modality and prompted layer, the K-means
centroids (``cmmm.kit.prompt_kit.kmeans``) of those pooled tokens over the training samples
where m is present, as buffers (in the state dict, never trained). A modality's bank is built
once, from the first dataset where it is present, and frozen from then on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmmm.backbone import MulT
from cmmm.errors import ConfigError
from cmmm.kit.prompt_kit import (
    PooledTokens,
    SitePrompts,
    frozen_inputs,
    frozen_site_tokens,
    kmeans,
    mean_pooled_modality_tokens,
)
from cmmm.options import Option


def pooled_site_tokens(
    backbone: MulT, x: Tensor, modalities: Sequence[str], layers: Sequence[int]
) -> PooledTokens:
    """Each modality's pooled tokens at ``layers`` for the packed input ``x``, from one
    prompt-free pass of the frozen backbone."""
    tokens = frozen_site_tokens(backbone, x, layers)
    return mean_pooled_modality_tokens(tokens, modalities, layers)


def bank_attention(queries: Tensor, bank: Tensor, heads: int) -> Tensor:
    """(..., L, d): multi-head attention of ``queries`` (..., L, d) over ``bank`` (N, d) as keys
    and values, without projections (AOEPT's parameter-free dot-product attention)."""
    *lead, length, width = queries.shape
    q = queries.reshape(-1, length, heads, width // heads).transpose(1, 2)
    kv = bank.reshape(1, len(bank), heads, width // heads).transpose(1, 2)
    kv = kv.expand(q.shape[0], -1, -1, -1)
    out = F.scaled_dot_product_attention(q, kv, kv)
    return out.transpose(1, 2).reshape(*lead, length, width)


# The heads of a bank attention, an option of the methods that attend over banks.
BANK_HEADS = Option(
    None,
    int,
    "heads of the bank attention (none: the backbone's)",
    minimum=1,
    nullable=True,
)


def attention_heads(owner: str, requested: int | None, backbone: MulT) -> int:
    """The heads of a bank attention: ``requested``, or the backbone's own number (None); they
    must divide the model width, since the attention has no projections to reshape it."""
    width = backbone.config.d_model
    heads = requested or backbone.config.num_heads
    if width % heads:
        raise ConfigError(
            f"{owner}: heads={heads} does not divide the model width d={width}; set -o heads "
            f"to a divisor of {width}"
        )
    return heads


class ModalityBanks(SitePrompts):
    """Site prompts with a frozen bank per (modality, prompted layer): buffers ``bank`` (M,
    layers, size, d), whose rows 0..bank_rows[m]-1 are valid for modality m, and ``bank_rows``
    (M,), 0 while m's bank is not built."""

    def __init__(self, backbone: MulT, layers: tuple[int, ...], size: int) -> None:
        super().__init__()
        self.modalities = tuple(backbone.layout.modalities)
        self.layers = layers
        width = backbone.config.d_model
        bank = torch.zeros(len(self.modalities), len(layers), size, width)
        self.register_buffer("bank", bank)
        self.register_buffer("bank_rows", torch.zeros(len(self.modalities), dtype=torch.long))

    def has_bank(self, modality: str) -> bool:
        return bool(self.bank_rows[self.modalities.index(modality)] > 0)

    def set_bank(self, modality: str, centroids: Sequence[Tensor]) -> None:
        """Store modality's bank, one (rows, d) centroid matrix per prompted layer."""
        index = self.modalities.index(modality)
        rows = {len(c) for c in centroids}
        if len(centroids) != len(self.layers) or len(rows) != 1:
            raise ConfigError(
                f"a bank needs one centroid matrix per prompted layer "
                f"({len(self.layers)}), all with the same number of rows; got "
                f"{len(centroids)} with rows {sorted(rows)}"
            )
        count = rows.pop()
        with torch.no_grad():
            self.bank[index].zero_()
            for i, c in enumerate(centroids):
                self.bank[index, i, :count] = c.to(self.bank)
        self.bank_rows[index] = count

    def valid_bank(self, index: int, layer_index: int) -> Tensor:
        return self.bank[index, layer_index, : int(self.bank_rows[index])]

    def bank_prompts(self, queries: Tensor, norms: Sequence[nn.Module], heads: int) -> Tensor:
        """(M, layers, L, d): for modality i and layer j, norms[i](Q + attn(Q, C, C)), Q the
        queries[i, j] (L, d) and C the bank of (i, j); norms[i](Q) while that bank is not built."""
        per_modality = []
        for i in range(len(self.modalities)):
            per_layer = []
            for j in range(len(self.layers)):
                query = queries[i, j]
                bank = self.valid_bank(i, j)
                attended = bank_attention(query, bank, heads) if len(bank) else 0.0
                per_layer.append(norms[i](query + attended))
            per_modality.append(torch.stack(per_layer))
        return torch.stack(per_modality)

    def joint_bank_prompts(self, queries: Tensor, norm: nn.Module, heads: int) -> Tensor:
        """(layers, L, d): for layer j, norm(Q + attn(Q, C, C)), Q the queries[j] (L, d) and C
        the rows of every built bank of layer j."""
        per_layer = []
        for j in range(len(self.layers)):
            query = queries[j]
            banks = [self.valid_bank(i, j) for i in range(len(self.modalities))]
            joint = torch.cat(banks)
            attended = bank_attention(query, joint, heads) if len(joint) else 0.0
            per_layer.append(norm(query + attended))
        return torch.stack(per_layer)

    def build_missing_banks(self, backbone: MulT, dataset: Any, seed: int) -> list[str]:
        """K-means banks for every modality that has none yet and is present somewhere in
        ``dataset`` (a training set); returns the modalities given a bank. With fewer samples
        than the bank size, fewer rows are kept (the same number at every layer)."""
        wanted = [m for m in self.modalities if not self.has_bank(m)]
        if not wanted:
            return []
        points: dict[tuple[str, int], list[Tensor]] = {
            (m, layer): [] for m in wanted for layer in self.layers
        }
        for x in frozen_inputs(backbone, dataset):
            pooled = pooled_site_tokens(backbone, x, self.modalities, self.layers)
            _, presence = backbone.layout.unpack(x)
            for m in wanted:
                rows = presence[:, self.modalities.index(m)] > 0.5
                for layer in self.layers:
                    points[(m, layer)].append(pooled[(m, layer)][rows])
        built = []
        bank_size = self.bank.shape[2]
        for m in wanted:
            per_layer = [torch.cat(points[(m, layer)]) for layer in self.layers]
            if len(per_layer[0]) == 0:
                continue  # m is missing from every sample of this dataset
            centroids = [kmeans(p, bank_size, seed=seed) for p in per_layer]
            rows = min(len(c) for c in centroids)
            self.set_bank(m, [c[:rows] for c in centroids])
            built.append(m)
        return built
