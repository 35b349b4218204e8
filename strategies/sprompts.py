"""S-Prompts (Wang et al., NeurIPS 2022; the S-iPrompts variant for a plain transformer) on the
frozen MulT.

One prompt and one head per domain (here: per task), each trained only on its own domain. After a
domain is trained, K-means (k = 5) on the frozen features of its training data gives that
domain's keys (centroids). At test every sample takes the domain of its nearest centroid over all
trained domains, and with it that domain's prompt and head; no task label is used.

Published defaults and their sources (the released S-Prompts code): ``prompt_length`` 10;
``n_centroids`` 5 (``KMeans(n_clusters=5, random_state=0)``); features L2-normalised before
clustering and matching; ``metric`` "l1": the released code's distance,
``(((f - c) ** 2) ** 0.5).sum(1)``, is the L1 distance ("l2" is offered); prompts initialised as
the weight of an ``nn.Linear(d, L, bias=False)`` (PyTorch's default, uniform(+-1/sqrt(d))).

Adaptations to MulT:

* S-iPrompts prepends its prompt tokens to the input sequence. Here a domain's prompt is prefix
  key/value tokens (the backbone's hook) at the front cross-modal layer(s), ``layers`` (default
  "0"), the same tokens for every cross-modal transformer; one (L, d) per layer and domain.
* The features are the frozen backbone's pooled features without prompts (``frozen_query``: eval
  mode, no gradient), the counterpart of S-Prompts' frozen image encoder output.
* The per-domain head: S-Prompts adds a new linear classifier per domain. MulT's classifier is
  ``out_layer`` (after the frozen residual MLP ``proj1``/``proj2``), so ``domain_head`` "out"
  (default) gives each domain its own copy of ``out_layer``, initialised from the pre-trained
  one (a random head would throw away the pre-trained read-out; regression streams have a single
  output). "all" copies the whole head (``proj1``, ``proj2``, ``out_layer``) per domain; "none"
  keeps the frozen shared head (prompts only).
* K-means is ``cmmm.prompt_kit.kmeans`` (k-means++ seeding, Lloyd iterations, seeded by
  ``kmeans_seed``). A domain with fewer training samples than ``n_centroids`` uses one centroid
  per sample.
* Regression needs nothing special: the domain's head outputs the prediction directly.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmmm.backbone import MulT
from cmmm.errors import ConfigError
from cmmm.options import Option
from cmmm.prompt_kit import (
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
from cmmm.prompted_model import TRAINABLE_HEADS, set_requires_grad
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
        self.domain_head: str = options["domain_head"]
        self.kmeans_seed: int = options["kmeans_seed"]
        # nn.Linear(d, L)'s default weight initialisation, uniform(+-1/sqrt(d)).
        shape = (len(self.layers), options["prompt_length"], width)
        self.prompt = nn.ParameterList(
            uniform_parameter(*shape, bound=1.0 / width**0.5) for _ in range(num_domains)
        )
        # Per domain, copies of the chosen head layers, initialised from the pre-trained ones.
        names = TRAINABLE_HEADS[self.domain_head]
        self.heads = nn.ModuleList(
            nn.ModuleDict({name: copy.deepcopy(getattr(backbone, name)) for name in names})
            for _ in range(num_domains)
        )
        for head in self.heads:
            set_requires_grad(head.parameters(), True)
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

    def head_layer(self, domain: int, name: str, backbone: MulT) -> nn.Module:
        head = self.heads[domain]
        return head[name] if name in head else getattr(backbone, name)

    def output(self, features: Tensor, domains: Tensor, backbone: MulT, training: bool) -> Tensor:
        """(B, output_dim): each sample through its domain's head (MulT's residual MLP head)."""
        if self.domain_head == "none":
            return backbone.head(features)
        outputs = features.new_zeros(len(features), backbone.config.output_dim)
        for domain in domains.unique().tolist():
            rows = (domains == domain).nonzero().squeeze(1)
            f = features[rows]
            proj1, proj2, out_layer = (
                self.head_layer(domain, name, backbone) for name in TRAINABLE_HEADS["all"]
            )
            hidden = F.dropout(F.relu(proj1(f)), backbone.config.out_dropout, training)
            outputs = outputs.index_copy(0, rows, out_layer(proj2(hidden) + f))
        return outputs

    def end_task(self, task: int, model: QueryPromptedModel, dataset: Any) -> None:
        backbone = model.backbone
        features = [frozen_query(backbone, x) for x in frozen_inputs(backbone, dataset)]
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
        output = prompts.output(features, self.last_choice, self.backbone, self.training)
        return output.squeeze(1) if self.backbone.config.output_dim == 1 else output


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
