"""The pieces the prompt-based strategies share, so that no strategy imports another.

* Options and checks: ``trainable_head_option``, ``normalise_layer_option``,
  ``check_layers_exist``, ``require_mult``.
* The frozen query (``frozen_query``: the backbone's prompt-free pooled features, as L2P's
  separate frozen "original model") and ``cosine_matrix``.
* Query-based prompting (L2P, DualPrompt, S-Prompts, CODA-Prompt): ``Selection``,
  ``LayerPrompts``, ``QueryPromptedModel`` and its task plugin ``make_task_plugin``;
  ``uniform_parameter`` (the reference code's "uniform" initialiser).
* K-means (``kmeans``: S-Prompts' domain keys, AOEPT's clustering).
* Site tokens (below), which MemPrompt and AOEPT condition their prompts on.

Site tokens: what the frozen backbone feeds its cross-modal attentions, read from its recording.

MemPrompt and AOEPT condition their prompts on "modality m's tokens at layer l". In MulT,
modality m's tokens at layer l are the key/value tokens of the cross-modal transformers whose
source is m: layer l's own LayerNorm of the embedded sequence of m, one copy per target (M-1 of
them, differing only by that LayerNorm). ``frozen_site_tokens`` runs the backbone once without
prompts (``frozen_query``: eval mode, no gradient) inside
``MulT.recording()`` and returns the key/value tokens each cross-modal layer received. Nothing of
the backbone is re-implemented or modified. A modality that is missing has its zero-filled block
here, so its tokens are the LayerNorm of the positional embedding alone: the same for every
sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmmm.backbone import MulT, PromptContext, PromptSite
from cmmm.errors import ConfigError
from cmmm.options import ConfigurableStrategy, Option, parse_layers
from cmmm.prompted_model import TRAINABLE_HEADS, PromptedModel, set_requires_grad

KMEANS_ITERATIONS = 100


def trainable_head_option(default: str, help_text: str) -> Option:
    return Option(default, str, help_text, choices=tuple(TRAINABLE_HEADS))


def normalise_layer_option(strategy: ConfigurableStrategy, name: str) -> tuple[int, ...]:
    """Parse a layer-list option and store it back in canonical form ("0,1")."""
    layers = parse_layers(strategy.family, name, strategy.opt(name))
    strategy._values[name] = ",".join(str(layer) for layer in layers)
    return layers


def check_layers_exist(owner: str, name: str, layers: Sequence[int], available: int) -> None:
    if max(layers) >= available:
        raise ConfigError(
            f"{owner}: {name}={','.join(map(str, layers))} but the backbone's cross-modal "
            f"transformers have layers 0..{available - 1}; set {name} (e.g. -o {name}=0)"
        )


def require_mult(owner: str, model: nn.Module) -> MulT:
    if not isinstance(model, MulT):
        raise ConfigError(f"{owner} needs the MulT backbone, got {type(model).__name__}")
    return model


def frozen_query(backbone: MulT, x: Tensor) -> Tensor:
    """(B, feature_dim): the backbone's pooled features of ``x`` without any prompt, computed in
    eval mode (no dropout) and without gradient. Every module's mode is restored afterwards."""
    modes = [(module, module.training) for module in backbone.modules()]
    backbone.eval()
    try:
        with torch.no_grad(), backbone.using_prompt_hook(None):
            return backbone.forward_features(x)
    finally:
        for module, was_training in modes:
            module.training = was_training


def cosine_matrix(query: Tensor, keys: Tensor) -> Tensor:
    """(B, K) cosine similarities of queries (B, D) and keys (K, D)."""
    return F.normalize(query, dim=1) @ F.normalize(keys, dim=1).T


@dataclass
class Selection:
    """What a query-based prompt module chose for one batch.

    ``prompts``: cross-modal layer -> (B, P, d) prefix tokens for every cross-modal transformer
    at that layer. ``aux_loss``: a term added to the training loss (None: nothing). ``choice``:
    the selected entries, for inspection (L2P: (B, N) pool indices; DualPrompt, S-Prompts: (B,)
    task indices; CODA: None).
    """

    prompts: dict[int, Tensor]
    aux_loss: Tensor | None = None
    choice: Tensor | None = None


class LayerPrompts(nn.Module):
    """Base of the query-based prompt modules: ``select`` computes a batch's prompts per layer
    (once per forward, from the query), ``prompt_for`` hands them to every cross-modal transformer
    at that layer. Subclasses may override ``begin_task``/``end_task`` (task boundaries)."""

    def __init__(self) -> None:
        super().__init__()
        self.current: dict[int, Tensor] | None = None

    def select(self, query: Tensor, task: int | None) -> Selection:
        raise NotImplementedError

    def prompt_for(self, site: PromptSite, ctx: PromptContext) -> Tensor | None:
        if not site.is_cross or self.current is None:
            return None
        return self.current.get(site.layer)

    def begin_task(self, task: int) -> None:
        """Before training experience ``task``: set ``requires_grad`` of the method's parameters
        (the caller then rebuilds the optimizer)."""

    def end_task(self, task: int, model: QueryPromptedModel, dataset: Any) -> None:
        """After training experience ``task`` (``dataset``: its Avalanche training set)."""


class QueryPromptedModel(PromptedModel):
    """A ``PromptedModel`` whose prompts are chosen per sample from the frozen query.

    ``forward``: query = ``frozen_query(backbone, x)``; the prompt module's ``select`` (given the
    current training task while training, None otherwise) gives the prompts per layer; the
    backbone runs with them through its hook; ``output`` maps the pooled features to the
    prediction (the backbone's own head by default). While training, ``aux_loss`` holds the
    selection's extra loss term for the task plugin to add.
    """

    def __init__(self, backbone: MulT, prompts: LayerPrompts, trainable_head: str = "none"):
        super().__init__(backbone, prompts, trainable_head)
        self.training_task: int | None = None
        self.aux_loss: Tensor | None = None
        self.last_choice: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        prompts: LayerPrompts = self.prompts  # type: ignore[assignment]
        query = frozen_query(self.backbone, x)
        task = self.training_task if self.training else None
        selection = prompts.select(query, task)
        self.aux_loss = selection.aux_loss if self.training else None
        self.last_choice = None if selection.choice is None else selection.choice.detach()
        prompts.current = selection.prompts
        try:
            with self.backbone.using_prompt_hook(prompts.prompt_for):
                features = self.backbone.forward_features(x)
        finally:
            prompts.current = None
        output = self.output(features, selection)
        return output.squeeze(1) if self.backbone.config.output_dim == 1 else output

    def output(self, features: Tensor, selection: Selection) -> Tensor:
        """(B, output_dim) from the pooled features; never squeezed."""
        return self.backbone.head(features)

    def begin_task(self, task: int) -> None:
        self.training_task = task
        set_requires_grad(self.method_parameters(), True)
        self.prompts.begin_task(task)  # type: ignore[operator]

    def end_task(self, task: int, dataset: Any) -> None:
        self.training_task = None
        self.aux_loss = None
        self.prompts.end_task(task, self, dataset)  # type: ignore[operator]
        # Outside training, requires_grad marks every parameter the method trains over the stream
        # (what the runner counts as trainable); the backbone stays frozen.
        set_requires_grad(self.method_parameters(), True)


def make_task_plugin(model: QueryPromptedModel) -> Any:
    """The plugin every query-based baseline uses: task boundaries (``begin_task`` then a new
    optimizer over what now has ``requires_grad``; ``end_task``), and the selection's auxiliary
    loss added in ``before_backward``."""
    from avalanche.core import SupervisedPlugin

    class QueryPromptPlugin(SupervisedPlugin):
        # For checkpoints: last_aux only reports the last minibatch; the model's training task
        # and auxiliary loss are cleared by end_task; nothing here reaches the next experience.
        stateless_between_experiences = True

        def __init__(self) -> None:
            super().__init__()
            self.last_aux: Tensor | None = None

        def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            model.begin_task(strategy.experience.current_experience)
            strategy.make_optimizer()

        def before_backward(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            if model.aux_loss is not None:
                self.last_aux = model.aux_loss.detach()
                strategy.loss = strategy.loss + model.aux_loss
                model.aux_loss = None

        def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            model.end_task(strategy.experience.current_experience, strategy.experience.dataset)

    return QueryPromptPlugin()


def uniform_parameter(*shape: int, bound: float = 1.0) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


def kmeans(points: Tensor, k: int, seed: int = 0, iterations: int = KMEANS_ITERATIONS) -> Tensor:
    """(min(k, N), D) centroids of ``points`` (N, D): k-means++ seeding, then Lloyd iterations
    until the assignment stops changing. Deterministic for a given ``seed``."""
    if points.dim() != 2 or len(points) == 0:
        raise ConfigError(f"kmeans needs a non-empty (N, D) tensor, got {tuple(points.shape)}")
    x = points.detach().double().cpu()
    k = min(k, len(x))
    generator = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(len(x), (1,), generator=generator))]
    nearest = ((x - x[chosen[0]]) ** 2).sum(dim=1)
    for _ in range(1, k):
        total = float(nearest.sum())
        if total > 0:
            index = int(torch.multinomial(nearest / total, 1, generator=generator))
        else:  # every point coincides with a centroid already: take any other point
            index = next(i for i in range(len(x)) if i not in chosen)
        chosen.append(index)
        nearest = torch.minimum(nearest, ((x - x[index]) ** 2).sum(dim=1))
    centroids = x[chosen].clone()
    assignment = None
    for _ in range(iterations):
        new_assignment = torch.cdist(x, centroids).argmin(dim=1)
        if assignment is not None and torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        for j in range(k):
            members = x[assignment == j]
            if len(members):
                centroids[j] = members.mean(dim=0)
    return centroids.to(points.dtype)


# (target, source, cross-modal layer) -> (B, L_source, d) key/value tokens.
SiteTokens = dict[tuple[str, str, int], Tensor]


def frozen_site_tokens(backbone: MulT, x: Tensor, layers: Sequence[int]) -> SiteTokens:
    """The key/value tokens of every cross-modal transformer at ``layers``, for the packed input
    ``x``, from one prompt-free pass of the frozen backbone."""
    with backbone.recording() as recording:
        frozen_query(backbone, x)
    wanted = set(layers)
    return {key: tokens for key, tokens in recording.cross_key_values.items() if key[2] in wanted}


def mean_pooled_modality_tokens(
    tokens: SiteTokens, modalities: Sequence[str], layers: Sequence[int]
) -> dict[tuple[str, int], Tensor]:
    """(modality, layer) -> (B, d): that modality's tokens mean-pooled over time, averaged over
    the M-1 cross-modal transformers that read them at that layer."""
    pooled: dict[tuple[str, int], Tensor] = {}
    for source in modalities:
        for layer in layers:
            copies = [tokens[(t, source, layer)].mean(dim=1) for t in modalities if t != source]
            pooled[(source, layer)] = sum(copies[1:], copies[0]) / len(copies)
    return pooled
