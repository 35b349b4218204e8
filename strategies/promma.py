"""ProMMA ("Evaluation Before Generation: A Paradigm for Robust Multimodal Sentiment Analysis with
Missing Modalities", ICME 2026; seed ``000_1bc230320942b0bd``) on the frozen MulT, trained task
after task (it has no continual mechanism), rebuilt from the abstract alone. MiPD: per prompted
cross-modal layer a shared and a private prompt per modality, kept orthogonal; MME: evaluators
scale a missing modality's private prompt; DPW: an InfoNCE critic weighs each source's slice of
the memory prompts; MPDC: those are the shared prompts' mean plus a residual per level. What is
taken from the abstract and how each part is reconstructed: docs/strategies.md#promma.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cmmm.backbone import MulT, PromptContext, PromptSite
from cmmm.kit.aux_losses import (
    CrossModalBatch,
    CrossModalCritic,
    WeightedAuxModel,
    WeightedAuxStrategy,
)
from cmmm.kit.modality_evaluators import ModalityEvaluators, evaluate_modalities
from cmmm.kit.orthogonal import pairwise_ortho_penalty
from cmmm.kit.prompt_init import normal_parameter
from cmmm.kit.prompt_kit import (
    TRAINABLE_HEAD,
    layers_option,
    per_source_prefix,
    pooled_projected_inputs,
    run_recording_cross_outputs,
)
from cmmm.options import Option
from cmmm.prompted_model import PromptedModel
from cmmm.strategy import STRATEGIES, StrategyContext

WEIGHTINGS = ("mi", "uniform")


@dataclass
class ProMMABatch(CrossModalBatch):
    """The current batch: what the critic reads, the (B, M) private-prompt scales c and the
    evaluators' (B, M) logits (None without evaluators)."""

    scales: Tensor
    logits: Tensor | None


class ProMMAPrompts(CrossModalCritic):
    """Shared, private and per-level residual prompts, the evaluators and the MI critic; the
    state of the current batch (``current``, a ``ProMMABatch``) feeds ``prompt_for``."""

    def __init__(self, backbone: MulT, options: Mapping[str, Any]) -> None:
        super().__init__()
        self.modalities = tuple(backbone.layout.modalities)
        self.layers: tuple[int, ...] = options["layers"]
        width, length = backbone.config.d_model, options["prompt_length"]
        n_mod, n_layers = len(self.modalities), len(self.layers)
        # Drawn in this order (shared, private, evaluators, critic): the seeded runs depend on it.
        self.shared = normal_parameter(n_layers, length, width, std=0.02)
        self.private = normal_parameter(n_mod, n_layers, length, width, std=0.02)
        self.residual = nn.Parameter(torch.zeros(backbone.config.self_layers, length, width))
        self.evaluators = ModalityEvaluators(width, n_mod) if options["evaluator"] else None
        self.add_critic(width, enabled=options["weighting"] == "mi")
        self.current: ProMMABatch | None = None

    def dynamic_weights(self, target: str) -> Tensor:
        """DPW: (B, M-1) omega of the sources of ``target`` (layout order), detached."""
        assert self.current is not None
        return self.source_weights(self.current, target)

    def orthogonality(self) -> Tensor:
        """The MiPD penalty, averaged over the prompted layers."""
        per_layer = [
            pairwise_ortho_penalty([self.shared[j], *self.private[:, j]])
            for j in range(len(self.layers))
        ]
        return torch.stack(per_layer).mean()

    def prompt_for(self, site: PromptSite, ctx: PromptContext) -> Tensor | None:
        if self.current is None:
            return None
        if site.is_cross:
            if site.layer not in self.layers:
                return None
            j = self.layers.index(site.layer)
            s = self.modalities.index(site.source)  # type: ignore[arg-type]
            private = self.current.scales[:, s, None, None] * self.private[s, j]
            return torch.cat([self.shared[j].expand(ctx.batch_size, -1, -1), private], dim=1)
        if site.layer >= len(self.residual):
            return None
        level = self.shared.mean(dim=0) + self.residual[site.layer]  # MPDC: (L, d)
        return per_source_prefix(self.dynamic_weights(site.target), level)


class ProMMAModel(WeightedAuxModel):
    """Evaluates, prompts and runs the frozen backbone; while training, ``aux_loss`` holds the
    weighted orthogonality, evaluator and critic terms for the plugin to add."""

    prompts: ProMMAPrompts

    def prepare(self, x: Tensor) -> Tensor:
        _, presence = self.backbone.layout.unpack(x)
        pooled = pooled_projected_inputs(self.backbone, x)
        logits, scales = evaluate_modalities(self.prompts.evaluators, pooled, presence)  # MME
        self.prompts.current = ProMMABatch(pooled, presence, scales=scales, logits=logits)
        return x

    def run_prompted(self, x: Tensor) -> Tensor:
        batch: ProMMABatch = self.prompts.current  # type: ignore[assignment]
        # DPW reads the cross-modal outputs of this very pass, as they are produced.
        return run_recording_cross_outputs(self.backbone, x, batch)

    def aux_terms(self, x: Tensor) -> dict[str, Tensor | None]:
        batch: ProMMABatch = self.prompts.current  # type: ignore[assignment]
        logits, presence = batch.logits, batch.presence
        return {
            "ortho_weight": self.prompts.orthogonality(),
            "evaluator_weight": ModalityEvaluators.loss(self.backbone, x, logits, presence),
            "mi_weight": self.prompts.critic_info_nce(batch),
        }


@STRATEGIES.register(
    "promma",
    "ProMMA (rebuilt from its abstract): evaluated private prompts, MI-weighted memory prompts",
)
class ProMMA(WeightedAuxStrategy):
    family = "promma"
    AUX_WEIGHTS = ("ortho_weight", "evaluator_weight", "mi_weight")
    OPTIONS = {
        "prompt_length": Option(16, int, "tokens of every prompt", minimum=1),
        "layers": layers_option("0,1,2", "cross-modal layers given shared and private prompts"),
        "ortho_weight": Option(0.1, float, "weight of the MiPD orthogonality penalty", minimum=0),
        "evaluator": Option(True, bool, "MME: scale a missing modality's prompt by e_m"),
        "evaluator_weight": Option(1.0, float, "weight of the evaluator's BCE", minimum=0),
        "weighting": Option("mi", str, "DPW weights of the memory prompts", choices=WEIGHTINGS),
        "mi_weight": Option(0.1, float, "weight of the MI critic's InfoNCE", minimum=0),
        "trainable_head": TRAINABLE_HEAD,
    }

    def make_model(self, backbone: MulT, ctx: StrategyContext) -> PromptedModel:
        prompts = ProMMAPrompts(backbone, self.settings())
        return ProMMAModel(backbone, prompts, self.opt("trainable_head"), self.loss_weights())
