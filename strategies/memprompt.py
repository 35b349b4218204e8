"""MemPrompt (Zhao, Xi, Fu and Zhao, "Enhancing Multimodal Model Robustness Under Missing
Modalities via Memory-Driven Prompt Learning"; seed ``002_ef34f62067adfdae``) on the frozen MulT,
trained task after task like every other baseline (it has no continual mechanism).

Per modality m and prompted layer l: a memory of K prompts (L x d) with keys, from which the
max-pool over time of m's tokens at that layer (also when m is missing) mixes the N prompts of
nearest key (cosine), softmax-weighted, into the generative prompt p_(g,m); and a shared prompt
S_m (L_s x d). Summed over a sample's missing modalities (every modality when it is complete),
the S_m are mapped by m's bottleneck MLP G_m (d -> d/r -> d, GELU) to p_(s,m). [p_(s,m) ; p_(g,m)]
is the key/value prefix of the cross-modal transformers whose source is m (there m's tokens are
the keys and values). What comes from the paper, what from its code, and the reconstruction for
MulT: docs/strategies.md#memprompt.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from cmmm.backbone import MulT, PromptSite
from cmmm.kit.prompt_init import kaiming_parameter, normal_parameter
from cmmm.kit.prompt_kit import (
    TRAINABLE_HEAD,
    PromptStrategy,
    SitePrompts,
    SiteTokens,
    cosine_matrix,
    frozen_site_tokens,
    layers_option,
    missing_or_every,
)
from cmmm.options import Option
from cmmm.prompted_model import PromptedModel
from cmmm.strategy import STRATEGIES, StrategyContext


def retrieve(memory: Tensor, keys: Tensor, query: Tensor, top_n: int) -> Tensor:
    """(B, L, d) generative prompts: the ``top_n`` prompts of ``memory`` (K, L, d) whose ``keys``
    (K, d) are nearest to each ``query`` (B, d) by cosine, weighted by a softmax over those
    ``top_n`` cosines and summed."""
    top = cosine_matrix(query, keys).topk(top_n, dim=1)
    weights = top.values.softmax(dim=1)  # (B, N)
    return torch.einsum("bn,bnld->bld", weights, memory[top.indices])


def _key(modality: str, layer: int) -> str:
    return f"{modality}_{layer}"


class MemPromptPrompts(SitePrompts):
    """Prompt memories, keys, shared prompts and bottleneck maps per (modality, layer)."""

    def __init__(self, backbone: MulT, options: Mapping[str, Any]) -> None:
        super().__init__()
        self.modalities = tuple(backbone.layout.modalities)
        self.layers: tuple[int, ...] = options["layers"]
        self.top_n: int = options["top_n"]
        width, memory_size = backbone.config.d_model, options["memory_size"]
        bottleneck = max(1, width // options["bottleneck_ratio"])
        self.memory = nn.ParameterDict()
        self.keys = nn.ParameterDict()
        self.maps = nn.ModuleDict()
        for m in self.modalities:
            for layer in self.layers:
                key = _key(m, layer)
                self.memory[key] = kaiming_parameter(memory_size, options["prompt_length"], width)
                self.keys[key] = kaiming_parameter(memory_size, width)
                self.maps[key] = self._bottleneck(width, bottleneck)
        # Per layer, the shared prompts of every modality stacked in layout order: (M, L_s, d).
        shared = (len(self.modalities), options["shared_length"], width)
        self.shared = nn.ParameterDict(
            {str(layer): normal_parameter(*shared, std=0.02) for layer in self.layers}
        )

    @staticmethod
    def _bottleneck(width: int, hidden: int) -> nn.Sequential:
        layers = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        for linear in (layers[0], layers[2]):
            nn.init.normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)
        return layers

    def site_prompts(
        self, tokens: SiteTokens, presence: Tensor
    ) -> dict[tuple[str, str, int], Tensor]:
        """Every prompted site's (B, L_s + L, d) prefix: [shared ; generative] of its source."""
        # The missing modalities' shared prompts, or every modality's for a complete sample.
        relevance = missing_or_every(presence)  # (B, M)
        prompts = {}
        for layer in self.layers:
            shared_sum = torch.einsum("bm,mld->bld", relevance, self.shared[str(layer)])
            for source in self.modalities:
                key = _key(source, layer)
                shared = self.maps[key](shared_sum)
                for target in self.modalities:
                    if target == source:
                        continue
                    query = tokens[(target, source, layer)].amax(dim=1)  # (B, d) max-pool
                    generative = retrieve(self.memory[key], self.keys[key], query, self.top_n)
                    prompts[(target, source, layer)] = torch.cat([shared, generative], dim=1)
        return prompts

    def site_key(self, site: PromptSite) -> tuple[str, str | None, int] | None:
        # The prompts of a cross-modal site (target, source, layer): [shared ; generative].
        return (site.target, site.source, site.layer) if site.is_cross else None


class MemPromptModel(PromptedModel):
    """Reads the frozen backbone's tokens at the prompted layers, builds every site's prompts
    from them, then runs the backbone with those prompts."""

    def prepare(self, x: Tensor) -> Tensor:
        prompts: MemPromptPrompts = self.prompts  # type: ignore[assignment]
        tokens = frozen_site_tokens(self.backbone, x, prompts.layers)
        _, presence = self.backbone.layout.unpack(x)
        prompts.current = prompts.site_prompts(tokens, presence)
        return x


@STRATEGIES.register(
    "memprompt",
    "MemPrompt: prompts retrieved from a per-modality memory plus mapped shared prompts",
)
class MemPrompt(PromptStrategy):
    family = "memprompt"
    OPTIONS = {
        "memory_size": Option(
            16, int, "prompts K in each memory (per modality and layer)", minimum=1
        ),
        "top_n": Option(5, int, "memory prompts mixed per query (top-N by cosine)", minimum=1),
        "prompt_length": Option(16, int, "tokens of a generative prompt", minimum=1),
        "shared_length": Option(16, int, "tokens of a shared prompt", minimum=1),
        "bottleneck_ratio": Option(
            16, int, "r of the shared prompts' d -> d/r -> d maps", minimum=1
        ),
        "layers": layers_option("0,1,2"),
        "trainable_head": TRAINABLE_HEAD,
    }

    def check(self) -> None:
        super().check()
        self.require_at_most("top_n", "memory_size")

    def make_model(self, backbone: MulT, ctx: StrategyContext) -> PromptedModel:
        prompts = MemPromptPrompts(backbone, self.settings())
        return MemPromptModel(backbone, prompts, self.opt("trainable_head"))
