"""S-Prompts (Wang et al., NeurIPS 2022; the S-iPrompts variant for a plain transformer) on the
frozen MulT.

One prompt and one head per domain (here: per task), each trained only on its own domain. After a
domain is trained, K-means (k = 5) on the frozen features of its training data gives that
domain's keys (centroids). At test every sample takes the domain of its nearest centroid over all
trained domains, and with it that domain's prompt and head; no task label is used.

The features are the frozen backbone's pooled features without prompts (``frozen_query``), and a
domain's prompt is prefix key/value tokens at the front cross-modal layer(s). Defaults, their
sources and the adaptations to MulT: docs/strategies.md#s-prompts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmmm.backbone import MulT
from cmmm.errors import ConfigError
from cmmm.kit.prompt_kit import (
    KMEANS_SEED,
    LayerPrompts,
    QueryPromptedModel,
    QueryPromptStrategy,
    Selection,
    TaskPrompts,
    frozen_inputs,
    frozen_query,
    kmeans,
    layers_option,
    uniform_parameter,
)
from cmmm.kit.task_heads import TaskHeads
from cmmm.options import Option
from cmmm.prompted_model import TRAINABLE_HEADS
from cmmm.strategy import STRATEGIES, StrategyContext

METRICS = ("l1", "l2")


def nearest_domain(
    features: Tensor, centroids: Tensor, valid: Tensor, metric: str = "l1"
) -> Tensor:
    """(B,) the domain of the nearest centroid: ``centroids`` (D, k, F), ``valid`` (D,) marks the
    domains that may be chosen; ``features`` (B, F) are compared as given (normalise first)."""
    if not bool(valid.any()):
        raise ConfigError("no domain has centroids yet")
    diff = features[:, None, None, :] - centroids[None]  # (B, D, k, F)
    distance = diff.abs().sum(-1) if metric == "l1" else diff.pow(2).sum(-1).sqrt()
    per_domain = distance.min(dim=2).values.masked_fill(~valid[None, :], float("inf"))
    return per_domain.argmin(dim=1)


class SPromptsPrompts(TaskPrompts):
    """Per domain a prompt and a head (the part that trains with its domain), its centroids, and
    the nearest-centroid selection."""

    def __init__(self, backbone: MulT, num_domains: int, options: Mapping[str, Any]) -> None:
        super().__init__(num_domains)
        width = backbone.config.d_model
        self.layers: tuple[int, ...] = options["layers"]
        self.metric: str = options["metric"]
        self.kmeans_seed: int = options["kmeans_seed"]
        # nn.Linear(d, L)'s default weight initialisation, uniform(+-1/sqrt(d)).
        shape = (len(self.layers), options["prompt_length"], width)
        self.prompt = nn.ParameterList(
            uniform_parameter(*shape, bound=1.0 / width**0.5) for _ in range(num_domains)
        )
        self.heads = TaskHeads(backbone, num_domains, options["domain_head"])
        centroids = torch.zeros(num_domains, options["n_centroids"], backbone.feature_dim)
        self.register_buffer("centroids", centroids)

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        return [self.prompt[task], *self.heads[task].parameters()]

    def nearest_task(self, query: Tensor) -> Tensor:
        """(B,) each sample's domain: the nearest centroid's (domain 0 before any training)."""
        if not bool(self.trained.any()):
            return torch.zeros(len(query), dtype=torch.long, device=query.device)
        return nearest_domain(F.normalize(query, dim=1), self.centroids, self.trained, self.metric)

    def select(self, query: Tensor, task: int | None) -> Selection:
        domains = self.tasks_of(query, task)
        chosen = self.per_sample(self.prompt, domains, task)  # (B, layers, L, d)
        return Selection(
            {layer: chosen[:, i] for i, layer in enumerate(self.layers)}, None, domains
        )

    def end_task(self, task: int, model: QueryPromptedModel, dataset: Any) -> None:
        backbone = model.backbone
        features = [frozen_query(backbone, x) for x in frozen_inputs(backbone, dataset)]
        # L2-normalised before clustering, and queries before matching, as the released code.
        points = F.normalize(torch.cat(features), dim=1)
        centroids = kmeans(points, self.centroids.shape[1], seed=self.kmeans_seed)
        # Fewer samples than centroids: repeat the first centroid (it changes no minimum).
        padded = centroids[:1].expand(self.centroids.shape[1], -1).clone()
        padded[: len(centroids)] = centroids
        self.centroids[task] = padded.to(self.centroids)
        super().end_task(task, model, dataset)


class SPromptsModel(QueryPromptedModel):
    """Per-sample head: the domain chosen by the selection picks the head as well."""

    def run(self, x: Tensor) -> Tensor:
        prompts: SPromptsPrompts = self.prompts  # type: ignore[assignment]
        assert self.last_choice is not None
        features = self.backbone.forward_features(x)
        output = prompts.heads.output(features, self.last_choice, self.backbone, self.training)
        return self.backbone.squeeze_output(output)


@STRATEGIES.register(
    "sprompts", "S-Prompts: a prompt and head per domain, picked by K-means centroids at test"
)
class SPrompts(QueryPromptStrategy):
    family = "sprompts"
    OPTIONS = {
        "prompt_length": Option(10, int, "tokens of each domain's prompt", minimum=1),
        "layers": layers_option("0", "cross-modal layers given the domain's prompt"),
        "n_centroids": Option(5, int, "K-means centroids per domain", minimum=1),
        "metric": Option("l1", str, "distance to the centroids", choices=METRICS),
        "domain_head": Option(
            "out", str, "head layers copied per domain", choices=tuple(TRAINABLE_HEADS)
        ),
        "kmeans_seed": KMEANS_SEED,
    }
    # The shared head stays frozen: each domain trains its own copy (domain_head).
    MODEL = SPromptsModel

    def make_prompts(self, backbone: MulT, ctx: StrategyContext) -> LayerPrompts:
        return SPromptsPrompts(backbone, self.task_count(ctx), self.settings())
