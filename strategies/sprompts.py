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
* K-means is this file's own (k-means++ seeding, Lloyd iterations, seeded by ``kmeans_seed``). A
  domain with fewer training samples than ``n_centroids`` uses one centroid per sample.
* Regression needs nothing special: the domain's head outputs the prediction directly.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from cmmm.backbone import MulT
from cmmm.errors import ConfigError
from cmmm.options import ConfigurableStrategy, Option
from cmmm.prompt_kit import (
    LayerPrompts,
    QueryPromptedModel,
    Selection,
    check_layers_exist,
    frozen_query,
    kmeans,
    make_task_plugin,
    normalise_layer_option,
    require_mult,
)
from cmmm.prompted_model import make_prompt_template, set_requires_grad
from cmmm.strategy import STRATEGIES, StrategyContext

METRICS = ("l1", "l2")
DOMAIN_HEADS = {"none": (), "out": ("out_layer",), "all": ("proj1", "proj2", "out_layer")}


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


class SPromptsPrompts(LayerPrompts):
    """Per-domain prompts (and heads), centroids and the nearest-centroid selection."""

    def __init__(
        self,
        backbone: MulT,
        num_domains: int,
        layers: Sequence[int],
        length: int,
        n_centroids: int,
        metric: str,
        domain_head: str,
        kmeans_seed: int,
    ) -> None:
        super().__init__()
        width = backbone.config.d_model
        self.layers = tuple(layers)
        self.metric = metric
        self.domain_head = domain_head
        self.kmeans_seed = kmeans_seed
        bound = 1.0 / width**0.5  # nn.Linear(d, L)'s default weight initialisation
        self.prompt = nn.ParameterList(
            nn.Parameter(torch.empty(len(self.layers), length, width).uniform_(-bound, bound))
            for _ in range(num_domains)
        )
        # Per domain, copies of the chosen head layers, initialised from the pre-trained ones.
        self.heads = nn.ModuleList(
            nn.ModuleDict(
                {name: copy.deepcopy(getattr(backbone, name)) for name in DOMAIN_HEADS[domain_head]}
            )
            for _ in range(num_domains)
        )
        for head in self.heads:
            set_requires_grad(head.parameters(), True)
        self.register_buffer(
            "centroids", torch.zeros(num_domains, n_centroids, backbone.feature_dim)
        )
        self.register_buffer("trained", torch.zeros(num_domains, dtype=torch.bool))

    def domains(self, query: Tensor) -> Tensor:
        """(B,) each sample's domain: the nearest centroid's (domain 0 before any training)."""
        if not bool(self.trained.any()):
            return torch.zeros(len(query), dtype=torch.long, device=query.device)
        return nearest_domain(F.normalize(query, dim=1), self.centroids, self.trained, self.metric)

    def select(self, query: Tensor, task: int | None) -> Selection:
        batch = query.shape[0]
        if task is None:
            domains = self.domains(query)
            chosen = torch.stack(list(self.prompt))[domains]  # (B, layers, L, d)
        else:
            domains = torch.full((batch,), task, dtype=torch.long, device=query.device)
            chosen = self.prompt[task].unsqueeze(0).expand(batch, -1, -1, -1)
        prompts = {layer: chosen[:, i] for i, layer in enumerate(self.layers)}
        return Selection(prompts, None, domains)

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
            proj1 = self.head_layer(domain, "proj1", backbone)
            proj2 = self.head_layer(domain, "proj2", backbone)
            out_layer = self.head_layer(domain, "out_layer", backbone)
            hidden = F.dropout(F.relu(proj1(f)), backbone.config.out_dropout, training)
            outputs = outputs.index_copy(0, rows, out_layer(proj2(hidden) + f))
        return outputs

    def begin_task(self, task: int) -> None:
        for domain, (prompt, head) in enumerate(zip(self.prompt, self.heads, strict=True)):
            set_requires_grad([prompt, *head.parameters()], domain == task)

    def end_task(self, task: int, model: QueryPromptedModel, dataset: Any) -> None:
        features = []
        device = next(model.backbone.parameters()).device
        for batch in DataLoader(dataset, batch_size=256, shuffle=False):
            features.append(frozen_query(model.backbone, batch[0].to(device)))
        points = F.normalize(torch.cat(features), dim=1)
        centroids = kmeans(points, self.centroids.shape[1], seed=self.kmeans_seed)
        # Fewer samples than centroids: repeat the first centroid (it changes no minimum).
        padded = centroids[:1].expand(self.centroids.shape[1], -1).clone()
        padded[: len(centroids)] = centroids
        self.centroids[task] = padded.to(self.centroids)
        self.trained[task] = True


class SPromptsModel(QueryPromptedModel):
    """Per-sample head: the domain chosen by the selection picks the head as well."""

    def output(self, features: Tensor, selection: Selection) -> Tensor:
        prompts: SPromptsPrompts = self.prompts  # type: ignore[assignment]
        assert selection.choice is not None
        return prompts.output(features, selection.choice, self.backbone, self.training)


@STRATEGIES.register(
    "sprompts", "S-Prompts: a prompt and head per domain, picked by K-means centroids at test"
)
class SPrompts(ConfigurableStrategy):
    family = "sprompts"
    OPTIONS = {
        "prompt_length": Option(10, int, "tokens of each domain's prompt", minimum=1),
        "layers": Option("0", str, "cross-modal layers given the domain's prompt"),
        "n_centroids": Option(5, int, "K-means centroids per domain", minimum=1),
        "metric": Option("l1", str, "distance to the centroids", choices=METRICS),
        "domain_head": Option(
            "out", str, "head layers copied per domain", choices=tuple(DOMAIN_HEADS)
        ),
        "kmeans_seed": Option(0, int, "seed of the K-means initialisation", minimum=0),
    }

    def check(self) -> None:
        self.layers = normalise_layer_option(self, "layers")

    def build(self, ctx: StrategyContext) -> Any:
        backbone = require_mult("sprompts", ctx.model)
        check_layers_exist("sprompts", "layers", self.layers, backbone.config.layers)
        num_domains = len(ctx.stream.tasks)
        if num_domains < 1:
            raise ConfigError("sprompts: the stream has no task")
        prompts = SPromptsPrompts(
            backbone,
            num_domains,
            self.layers,
            self.opt("prompt_length"),
            self.opt("n_centroids"),
            self.opt("metric"),
            self.opt("domain_head"),
            self.opt("kmeans_seed"),
        )
        model = SPromptsModel(backbone, prompts, "none")
        self.model = model
        return make_prompt_template(model, ctx, plugins=[make_task_plugin(model)])
