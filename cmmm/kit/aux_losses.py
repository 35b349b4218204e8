"""Auxiliary loss terms a method adds to its task loss.

* ``weighted_terms``: the weighted sum of named terms, each with its own weight option, and
  ``WeightedAuxModel``, a ``PromptedModel`` whose ``aux_loss`` is that sum after every training
  forward (for ``cmmm.kit.prompt_kit.aux_loss_plugin`` to add).
  ``WeightedAuxStrategy`` declares which options weigh the terms and adds the plugin.
* A contrastive critic (``bilinear_scores``, ``info_nce``: InfoNCE, a standard lower bound of the
  mutual information between two views of the same samples) and ``CrossModalCritic``, which
  scores each cross-modal transformer's output against its source modality's pooled input, on
  the batch state ``CrossModalBatch``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmmm.backbone import MulT
from cmmm.kit.prompt_kit import PromptStrategy, aux_loss_plugin
from cmmm.prompted_model import PromptedModel


def weighted_terms(
    terms: Mapping[str, Tensor | None], weights: Mapping[str, float]
) -> tuple[Tensor | None, dict[str, Tensor]]:
    """The sum of ``weights[name] * term`` over the terms that exist (not None) and weigh more
    than zero, in ``terms``' order (None when none does), and those terms' detached values, for
    reporting."""
    total: Tensor | None = None
    kept: dict[str, Tensor] = {}
    for name, value in terms.items():
        if value is None or weights[name] == 0:
            continue
        kept[name] = value.detach()
        weighted = weights[name] * value
        total = weighted if total is None else total + weighted
    return total, kept


def bilinear_scores(left: nn.Module, right: nn.Module, u: Tensor, v: Tensor) -> Tensor:
    """(B, B) critic scores <left(u_i), right(v_j)> / sqrt(d) of every pair of rows of ``u`` and
    ``v`` (B, d_u) and (B, d_v), left and right mapping both into d dimensions."""
    a, b = left(u), right(v)
    return a @ b.T / math.sqrt(a.shape[1])


def info_nce(scores: Tensor) -> Tensor:
    """InfoNCE of a (B, B) score matrix whose diagonal holds the matching pairs: the
    cross-entropy of each row against its own column."""
    labels = torch.arange(len(scores), device=scores.device)
    return F.cross_entropy(scores, labels)


def cosine_info_nce(prompts: Tensor, features: Tensor, log_scale: Tensor) -> Tensor:
    """InfoNCE of cosine scores (times exp(log_scale)) between matching rows of ``prompts`` and
    ``features`` (B, d), each row against every other row of the batch (AOEPT's
    prompt-to-modality loss)."""
    scores = F.normalize(prompts, dim=1) @ F.normalize(features, dim=1).T * log_scale.exp()
    return info_nce(scores)


class WeightedAuxModel(PromptedModel):
    """A prompted model whose method adds named auxiliary terms (``aux_terms``), each weighted by
    ``loss_weights[name]``: after a training forward, ``aux_loss`` is their weighted sum and
    ``last_terms`` their detached values; outside training ``aux_loss`` is None."""

    def __init__(
        self,
        backbone: MulT,
        prompts: nn.Module,
        trainable_head: str,
        loss_weights: dict[str, float],
    ) -> None:
        super().__init__(backbone, prompts, trainable_head)
        self.loss_weights = loss_weights
        self.last_terms: dict[str, Tensor] = {}

    def aux_terms(self, x: Tensor) -> dict[str, Tensor | None]:
        """The batch's terms by weight name (None: no term this batch), after ``run_prompted``."""
        raise NotImplementedError

    def run_prompted(self, x: Tensor) -> Tensor:
        """The prediction for the prepared input: the backbone's, unless a method records more."""
        return self.backbone(x)

    def run(self, x: Tensor) -> Tensor:
        output = self.run_prompted(x)
        self.aux_loss = None
        if self.training:
            self.aux_loss, self.last_terms = weighted_terms(self.aux_terms(x), self.loss_weights)
        return output


class WeightedAuxStrategy(PromptStrategy):
    """A prompt strategy whose model is a ``WeightedAuxModel``: ``AUX_WEIGHTS`` names the options
    that weigh its terms (each term is named after its weight option)."""

    AUX_WEIGHTS: ClassVar[tuple[str, ...]] = ()

    def loss_weights(self) -> dict[str, float]:
        return {name: self.opt(name) for name in self.AUX_WEIGHTS}

    def make_plugins(self, model: Any) -> list[Any]:
        # The model weighs its terms itself (loss_weights); the plugin adds their sum.
        return [aux_loss_plugin(model)]


@dataclass
class CrossModalBatch:
    """What a ``CrossModalCritic`` reads of the current batch: the (B, M, d) pooled inputs and the
    (B, M) presence mask, the (target, source) -> (B, L, d) cross-modal outputs as they are
    produced (``cmmm.kit.prompt_kit.run_recording_cross_outputs``), and target -> (B, M-1) source
    weights once computed."""

    pooled: Tensor
    presence: Tensor
    cross_outputs: dict[tuple[str, str], Tensor] = field(default_factory=dict, kw_only=True)
    source_weight_cache: dict[str, Tensor] = field(default_factory=dict, kw_only=True)


class CrossModalCritic(nn.Module):
    """Base of a prompt module with a critic between the time-mean output u of each cross-modal
    transformer target <- source and the source's (B, d) pooled input v: score(u, v) =
    <W_u u, W_v v> / sqrt(d). The two maps are the module's own attributes ``critic_output`` and
    ``critic_source`` (None without a critic), so its state_dict keys name them directly; the
    subclass sets ``modalities`` (layout order) and calls ``add_critic`` where it draws them."""

    modalities: tuple[str, ...]
    critic_output: nn.Linear | None
    critic_source: nn.Linear | None

    def add_critic(self, width: int, enabled: bool) -> None:
        self.critic_output = nn.Linear(width, width, bias=False) if enabled else None
        self.critic_source = nn.Linear(width, width, bias=False) if enabled else None

    def source_weights(self, batch: CrossModalBatch, target: str) -> Tensor:
        """(B, M-1) detached weights of the sources of ``target`` (layout order): M-1 times the
        softmax over the sources of each sample's score; 1 each without a critic. Computed once
        per batch and target."""
        if target not in batch.source_weight_cache:
            batch.source_weight_cache[target] = self._source_weights(batch, target)
        return batch.source_weight_cache[target]

    def _source_weights(self, batch: CrossModalBatch, target: str) -> Tensor:
        sources = [i for i, s in enumerate(self.modalities) if s != target]
        if self.critic_output is None or self.critic_source is None:
            return batch.pooled.new_ones(len(batch.pooled), len(sources))
        with torch.no_grad():
            scores = []
            for i in sources:
                u = batch.cross_outputs[(target, self.modalities[i])].mean(dim=1)
                v = batch.pooled[:, i]
                scores.append(
                    bilinear_scores(self.critic_output, self.critic_source, u, v).diagonal()
                )
            return len(sources) * torch.stack(scores, dim=1).softmax(dim=1)

    def critic_info_nce(self, batch: CrossModalBatch) -> Tensor | None:
        """The critic's InfoNCE, averaged over every (target, source) with two or more samples
        where the source is present (the outputs detached); None when there is none."""
        if self.critic_output is None or self.critic_source is None:
            return None
        terms = []
        for (_, source), output in batch.cross_outputs.items():
            index = self.modalities.index(source)
            rows = batch.presence[:, index] > 0.5
            if int(rows.sum()) < 2:
                continue
            u, v = output[rows].mean(dim=1).detach(), batch.pooled[rows, index]
            terms.append(info_nce(bilinear_scores(self.critic_output, self.critic_source, u, v)))
        return torch.stack(terms).mean() if terms else None
