"""AOEPT (Lang, Hong, Zhong and Zhou, "Breaking the Implicit Modality-Reduction Bottleneck in
Modality-Missing Prompt Tuning", ICML 2026; seed ``001_c3b23fbb85f65bb6``) on the frozen MulT,
trained task after task like every other baseline (it has no continual mechanism).

Queries Q_(m,l) attend over a frozen K-means bank of m's pooled tokens (``cmmm.kit.token_banks``),
P_(m,l) = LN_m(Q + attn(Q, C, C)), gated by the other modalities (``cmmm.kit.modality_gates``) and
summed over modalities after a shared prompt; InfoNCE (``cmmm.contrastive``) ties them to m's
tokens. Sources and the reconstruction for MulT and the stream: docs/strategies.md#aoept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from cmmm.backbone import MulT
from cmmm.kit.aux_losses import cosine_info_nce
from cmmm.kit.modality_gates import gate_mlp, instance_gates, presence_gate
from cmmm.kit.prompt_init import normal_parameter
from cmmm.kit.prompt_kit import (
    KMEANS_SEED,
    TRAINABLE_HEAD,
    PooledTokens,
    PromptStrategy,
    aux_loss_plugin_class,
    layers_option,
    missing_or_every,
)
from cmmm.kit.token_banks import BANK_HEADS, ModalityBanks, attention_heads, pooled_site_tokens
from cmmm.options import Option
from cmmm.prompted_model import PromptedModel
from cmmm.strategy import STRATEGIES, StrategyContext


class AOEPTPrompts(ModalityBanks):
    """Frozen banks, queries, LayerNorms and gates; each cross-modal layer's prefix per batch."""

    def __init__(self, backbone: MulT, heads: int, options: Mapping[str, Any]) -> None:
        super().__init__(backbone, options["layers"], options["bank_size"])
        self.heads = heads
        self.use_shared: bool = options["shared_prompt"]
        width, length = backbone.config.d_model, options["prompt_length"]
        gate_hidden = max(1, width // options["gate_reduction"])
        n_mod, n_layers = len(self.modalities), len(self.layers)
        self.queries = normal_parameter(n_mod, n_layers, length, width, std=0.02)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in self.modalities)
        self.gates = nn.ModuleList(gate_mlp(width, gate_hidden) for _ in self.modalities)
        if self.use_shared:
            self.shared_query = normal_parameter(n_layers, length, width, std=0.02)
            self.shared_norm = nn.LayerNorm(width)
            self.shared_gate = gate_mlp(width, gate_hidden)
        self.log_scale = nn.Parameter(torch.tensor(math.log(100.0)))

    def gate_values(self, pooled: PooledTokens, presence: Tensor) -> dict[tuple[str, int], Tensor]:
        return instance_gates(self.gates, pooled, presence, self.modalities, self.layers)

    def layer_prompts(
        self, pooled: PooledTokens, presence: Tensor, with_aux: bool
    ) -> tuple[dict[int, Tensor], Tensor | None]:
        """Each prompted layer's (B, P, d) prefix, and (``with_aux``) the mean InfoNCE."""
        prompts = self.bank_prompts(self.queries, self.norms, self.heads)  # (M, layers, L, d)
        gates = self.gate_values(pooled, presence)
        # w_m: 1 for each missing modality; 1/M for every modality of a complete sample.
        weights = missing_or_every(presence, 1.0 / presence.shape[1])  # (B, M)
        present = presence > 0.5
        shared = None
        if self.use_shared:
            shared = self.joint_bank_prompts(self.shared_query, self.shared_norm, self.heads)
        layer_prompts: dict[int, Tensor] = {}
        terms: list[Tensor] = []
        for j, layer in enumerate(self.layers):
            combined = 0.0
            for i, m in enumerate(self.modalities):
                gated = gates[(m, layer)][:, None, :] * prompts[i, j]  # (B, L, d)
                combined = combined + weights[:, i, None, None] * gated
                rows = present[:, i]
                if with_aux and int(rows.sum()) >= 2:
                    summary = gated[rows].mean(dim=1)
                    terms.append(cosine_info_nce(summary, pooled[(m, layer)][rows], self.log_scale))
            assert isinstance(combined, Tensor)
            if shared is not None:
                gate = presence_gate(self.shared_gate, pooled, presence, self.modalities, layer)
                combined = torch.cat([gate[:, None, :] * shared[j], combined], dim=1)
            layer_prompts[layer] = combined
        aux = torch.stack(terms).mean() if terms else None
        return layer_prompts, aux


class AOEPTModel(PromptedModel):
    """Builds the layers' prompts from the frozen backbone's pooled tokens and the banks; while
    training, ``aux_loss`` holds the InfoNCE term for the plugin to add."""

    def prepare(self, x: Tensor) -> Tensor:
        prompts: AOEPTPrompts = self.prompts  # type: ignore[assignment]
        pooled = pooled_site_tokens(self.backbone, x, prompts.modalities, prompts.layers)
        _, presence = self.backbone.layout.unpack(x)
        prompts.current, aux = prompts.layer_prompts(pooled, presence, with_aux=self.training)
        self.aux_loss = aux if self.training else None
        return x


def make_aoept_plugin(model: AOEPTModel, kmeans_seed: int, aux_weight: float) -> Any:
    """Builds the missing banks before each experience trains, and adds ``aux_weight`` times the
    InfoNCE term to the loss of every training minibatch."""

    class AOEPTPlugin(aux_loss_plugin_class()):  # type: ignore[misc]
        # The banks live in the prompt module's buffers (bank_rows says which exist), so a
        # checkpoint of the model carries them; ``built`` is only a record for inspection.
        def __init__(self) -> None:
            super().__init__(model, aux_weight)
            self.built: dict[int, list[str]] = {}

        def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            experience = strategy.experience.current_experience
            prompts: AOEPTPrompts = model.prompts  # type: ignore[assignment]
            data = strategy.experience.dataset
            self.built[experience] = prompts.build_missing_banks(model.backbone, data, kmeans_seed)

    return AOEPTPlugin()


@STRATEGIES.register(
    "aoept", "AOEPT: gated prompts that attend over K-means banks of each modality's tokens"
)
class AOEPT(PromptStrategy):
    family = "aoept"
    OPTIONS = {
        "bank_size": Option(32, int, "K-means rows N of each (modality, layer) bank", minimum=1),
        "prompt_length": Option(16, int, "query and prompt length L", minimum=1),
        "layers": layers_option("0,1,2"),
        "gate_reduction": Option(16, int, "r of the gate MLP d -> d/r -> d", minimum=1),
        "heads": BANK_HEADS,
        "aux_weight": Option(0.05, float, "weight of the InfoNCE term", minimum=0),
        "shared_prompt": Option(True, bool, "also a shared prompt over every bank"),
        "kmeans_seed": KMEANS_SEED,
        "trainable_head": TRAINABLE_HEAD,
    }

    def make_model(self, backbone: MulT, ctx: StrategyContext) -> PromptedModel:
        heads = attention_heads("aoept", self.opt("heads"), backbone)
        prompts = AOEPTPrompts(backbone, heads, self.settings())
        return AOEPTModel(backbone, prompts, self.opt("trainable_head"))

    def make_plugins(self, model: Any) -> list[Any]:
        return [make_aoept_plugin(model, self.opt("kmeans_seed"), self.opt("aux_weight"))]
