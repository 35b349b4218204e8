"""The pieces the prompt-based strategies share, so that no strategy imports another.

* Options and checks, each declared once: ``TRAINABLE_HEAD``, ``KMEANS_SEED``, ``layers_option``,
  ``normalise_layer_option``, ``check_layers_exist``, ``require_mult``.
* ``PromptStrategy``: the strategy side every prompt baseline shares (layer options parsed and
  checked against the backbone, the template built around its ``PromptedModel``);
  ``aux_loss_plugin``: the plugin adding a model's ``aux_loss`` to the training loss.
* ``SitePrompts``: a prompt module whose prompts its model's ``prepare`` computes per batch
  (``current``), handed to the sites by ``site_key``.
* The frozen query (``frozen_query``: the backbone's prompt-free pooled features, as L2P's
  separate frozen "original model"), its output (``frozen_output``), ``frozen_inputs`` (an
  experience's inputs, batch by batch), ``pooled_projected_inputs`` (each modality's projected
  tokens, mean over time) and ``cosine_matrix``.
* Query-based prompting (L2P, DualPrompt, S-Prompts, CODA-Prompt): ``Selection``,
  ``LayerPrompts``, ``TaskPrompts`` (a part per task), ``QueryPromptedModel``, its task plugin
  ``make_task_plugin`` and ``QueryPromptStrategy``; ``uniform_parameter`` (the reference code's
  "uniform" initialiser).
* K-means (``kmeans``: S-Prompts' domain keys, AOEPT's clustering).
* Site tokens (below), which MemPrompt and AOEPT condition their prompts on, and
  ``missing_or_every``, the modalities their prompts stand in for.
* The cross-modal transformers' outputs of the prompted pass itself
  (``run_recording_cross_outputs``), and ``per_source_prefix``, a memory transformer's prefix
  with one weighted slice per source.

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

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from cmmm.backbone import MulT, PromptContext, PromptSite
from cmmm.errors import ConfigError
from cmmm.options import ConfigurableStrategy, Option, parse_layers
from cmmm.prompted_model import (
    HEAD_CHOICES,
    PromptedModel,
    make_prompt_template,
    set_requires_grad,
)
from cmmm.strategy import StrategyContext

KMEANS_ITERATIONS = 100
# Batch size of the frozen passes over an experience's training set (no gradient is kept).
FROZEN_BATCH_SIZE = 256

# Every prompt baseline trains MulT's out_layer with its prompts by default: each published method
# trains its classifier on top of the frozen encoder, and out_layer is MulT's counterpart.
TRAINABLE_HEAD = Option(
    "out",
    str,
    "head layers trained with the prompts (pattern: an output layer per missing pattern, as "
    "ours' default, offered so the comparison with ours stays fair)",
    choices=HEAD_CHOICES,
)
KMEANS_SEED = Option(0, int, "seed of the K-means initialisation", minimum=0)


def layers_option(default: str, help_text: str = "cross-modal layers given prompts") -> Option:
    """A cross-modal layer list ("0,1,2"); ``PromptStrategy`` parses and checks it."""
    return Option(default, str, help_text)


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


def frozen_output(backbone: MulT, x: Tensor) -> Tensor:
    """(B, output_dim): the frozen pre-trained backbone's output without prompts (eval mode, no
    gradient; ``frozen_query`` restores every module's mode, this restores the head's flag)."""
    features = frozen_query(backbone, x)
    was_training = backbone.training
    backbone.training = False  # MulT.head reads its own flag for the output dropout
    try:
        with torch.no_grad():
            return backbone.head(features)
    finally:
        backbone.training = was_training


def pooled_projected_inputs(backbone: MulT, x: Tensor) -> Tensor:
    """(B, M, d): every modality's projected tokens (the backbone's input projections), mean over
    time, without gradient (zero when the modality is missing)."""
    features, _ = backbone.layout.unpack(x)
    with torch.no_grad():
        return torch.stack(
            [
                backbone.projections[m](features[m].transpose(1, 2)).mean(dim=2)
                for m in backbone.layout.modalities
            ],
            dim=1,
        )


def frozen_inputs(backbone: MulT, dataset: Any) -> Iterator[Tensor]:
    """The packed inputs of ``dataset`` (an Avalanche training set), in order, batch by batch, on
    the backbone's device: what the methods that summarise an experience run frozen passes on."""
    device = next(backbone.parameters()).device
    for batch in DataLoader(dataset, batch_size=FROZEN_BATCH_SIZE, shuffle=False):
        yield batch[0].to(device)


def cosine_matrix(query: Tensor, keys: Tensor) -> Tensor:
    """(B, K) cosine similarities of queries (B, D) and keys (K, D)."""
    return F.normalize(query, dim=1) @ F.normalize(keys, dim=1).T


class SitePrompts(nn.Module):
    """A prompt module whose prompts are computed per batch: the model's ``prepare`` stores them in
    ``current`` (site key -> tensor) and ``PromptedModel`` clears it after the pass. ``site_key``
    says which entry a site reads (None: no prompt); by default a cross-modal site reads its
    layer's, the same prompt for every cross-modal transformer at that layer."""

    def __init__(self) -> None:
        super().__init__()
        self.current: dict[Any, Tensor] | None = None

    def site_key(self, site: PromptSite) -> Any:
        return site.layer if site.is_cross else None

    def prompt_for(self, site: PromptSite, ctx: PromptContext) -> Tensor | None:
        key = None if self.current is None else self.site_key(site)
        return None if key is None else self.current.get(key)  # type: ignore[union-attr]


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


class LayerPrompts(SitePrompts):
    """Base of the query-based prompt modules: ``select`` computes a batch's prompts per layer
    (once per forward, from the query), ``prompt_for`` hands them to every cross-modal transformer
    at that layer. Subclasses may override ``begin_task``/``end_task`` (task boundaries)."""

    def select(self, query: Tensor, task: int | None) -> Selection:
        raise NotImplementedError

    def begin_task(self, task: int) -> None:
        """Before training experience ``task``: set ``requires_grad`` of the method's parameters
        (the caller then rebuilds the optimizer)."""

    def end_task(self, task: int, model: QueryPromptedModel, dataset: Any) -> None:
        """After training experience ``task`` (``dataset``: its Avalanche training set)."""


class TaskPrompts(LayerPrompts):
    """Query-based prompts with a part per task (DualPrompt's E-prompts, S-Prompts' domains,
    CODA-Prompt's slices): only the training task's part trains (``begin_task``; the parts are
    ``task_parameters``), and ``trained`` marks the tasks trained so far (``end_task``)."""

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.register_buffer("trained", torch.zeros(num_tasks, dtype=torch.bool))

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        raise NotImplementedError

    def nearest_task(self, query: Tensor) -> Tensor:
        """(B,) the task each query is nearest to, outside training."""
        raise NotImplementedError

    def tasks_of(self, query: Tensor, task: int | None) -> Tensor:
        """(B,) each sample's task: the training task for every sample, else the nearest."""
        if task is None:
            return self.nearest_task(query)
        return torch.full((len(query),), task, dtype=torch.long, device=query.device)

    @staticmethod
    def per_sample(parts: nn.ParameterList, tasks: Tensor, task: int | None) -> Tensor:
        """(B, *part) each sample's part: indexed by ``tasks``, or the training task's expanded."""
        if task is None:
            return torch.stack(list(parts))[tasks]
        return parts[task].unsqueeze(0).expand(len(tasks), *parts[task].shape)

    def begin_task(self, task: int) -> None:
        for t in range(len(self.trained)):
            set_requires_grad(self.task_parameters(t), t == task)

    def end_task(self, task: int, model: QueryPromptedModel, dataset: Any) -> None:
        self.trained[task] = True


class QueryPromptedModel(PromptedModel):
    """A ``PromptedModel`` whose prompts are chosen per sample from the frozen query.

    ``prepare``: query = ``frozen_query(backbone, x)``; the prompt module's ``select`` (given the
    current training task while training, None otherwise) gives the prompts per layer, which the
    backbone then runs with. While training, ``aux_loss`` holds the selection's extra loss term
    for the task plugin to add; ``last_choice`` keeps the selection's choice.
    """

    def __init__(self, backbone: MulT, prompts: LayerPrompts, trainable_head: str = "none"):
        super().__init__(backbone, prompts, trainable_head)
        self.training_task: int | None = None
        self.last_choice: Tensor | None = None

    def prepare(self, x: Tensor) -> Tensor:
        prompts: LayerPrompts = self.prompts  # type: ignore[assignment]
        query = frozen_query(self.backbone, x)
        task = self.training_task if self.training else None
        selection = prompts.select(query, task)
        self.aux_loss = selection.aux_loss if self.training else None
        self.last_choice = None if selection.choice is None else selection.choice.detach()
        prompts.current = selection.prompts
        return x

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


@functools.cache
def aux_loss_plugin_class() -> type:
    """The class of ``aux_loss_plugin``, made on first use (importing Avalanche takes seconds);
    plugins that also act at task boundaries subclass it."""
    from avalanche.core import SupervisedPlugin

    class AuxLossPlugin(SupervisedPlugin):
        """Adds ``aux_weight`` times the model's ``aux_loss`` (its method's extra term for this
        minibatch, None: nothing) to the training loss, in ``before_backward``."""

        # For checkpoints: last_aux only reports the last minibatch and the model's aux_loss is
        # consumed by the step that made it; nothing here reaches the next experience.
        stateless_between_experiences = True
        # Its name before the method kit moved into cmmm/kit (checkpoints written then resume).
        former_names = ("cmmm.prompt_kit.aux_loss_plugin_class.<locals>.AuxLossPlugin",)

        def __init__(self, model: PromptedModel, aux_weight: float = 1.0) -> None:
            super().__init__()
            self.prompted = model
            self.aux_weight = aux_weight
            self.last_aux: Tensor | None = None

        def before_backward(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            model = self.prompted
            if model.aux_loss is not None:
                self.last_aux = model.aux_loss.detach()
                # Multiplying by 1.0 is exact, so an unweighted term is added unchanged.
                strategy.loss = strategy.loss + self.aux_weight * model.aux_loss
                model.aux_loss = None

    return AuxLossPlugin


def aux_loss_plugin(model: PromptedModel, aux_weight: float = 1.0) -> Any:
    """A plugin adding ``aux_weight`` times ``model.aux_loss`` to each training minibatch's loss."""
    return aux_loss_plugin_class()(model, aux_weight)


def make_task_plugin(model: QueryPromptedModel) -> Any:
    """The plugin every query-based baseline uses: task boundaries (``begin_task`` then a new
    optimizer over what now has ``requires_grad``; ``end_task``), and the selection's auxiliary
    loss added in ``before_backward``."""

    class QueryPromptPlugin(aux_loss_plugin_class()):  # type: ignore[misc]
        former_names = ("cmmm.prompt_kit.make_task_plugin.<locals>.QueryPromptPlugin",)

        def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            model.begin_task(strategy.experience.current_experience)
            strategy.make_optimizer()

        def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            model.end_task(strategy.experience.current_experience, strategy.experience.dataset)

    return QueryPromptPlugin(model)


class PromptStrategy(ConfigurableStrategy):
    """The strategy side every prompt baseline shares. The cross-modal layer options named in
    ``LAYER_OPTIONS`` become attributes of the same name (tuples; recorded as "0,1") and are
    checked against the backbone; ``build`` wraps the frozen MulT with ``make_model`` and trains
    it, with ``make_plugins``' plugins, through ``make_prompt_template``."""

    LAYER_OPTIONS: ClassVar[tuple[str, ...]] = ("layers",)
    layers: tuple[int, ...]

    def check(self) -> None:
        for name in self.LAYER_OPTIONS:
            setattr(self, name, normalise_layer_option(self, name))

    def require_at_most(self, name: str, limit: str) -> None:
        """Option ``name`` may not exceed option ``limit`` (how many of a pool are picked)."""
        if self.opt(name) > self.opt(limit):
            raise ConfigError(
                f"{self.family}: {name} ({self.opt(name)}) cannot exceed {limit} "
                f"({self.opt(limit)})"
            )

    def settings(self) -> dict[str, Any]:
        """Every option's value, the layer options as tuples: what a method's prompt module is
        built from, so that each option is named once, where it is declared and where it is used."""
        values = self.options()
        values.update({name: getattr(self, name) for name in self.LAYER_OPTIONS})
        return values

    def make_model(self, backbone: MulT, ctx: StrategyContext) -> PromptedModel:
        raise NotImplementedError

    def make_plugins(self, model: Any) -> list[Any]:
        return []

    def task_count(self, ctx: StrategyContext) -> int:
        """The stream's number of tasks, for methods with something per task."""
        if not ctx.stream.tasks:
            raise ConfigError(f"{self.family}: the stream has no task")
        return len(ctx.stream.tasks)

    def build(self, ctx: StrategyContext) -> Any:
        backbone = require_mult(self.family, ctx.model)
        for name in self.LAYER_OPTIONS:
            check_layers_exist(self.family, name, getattr(self, name), backbone.config.layers)
        # Kept on the strategy for inspection.
        self.model = self.make_model(backbone, ctx)
        return make_prompt_template(self.model, ctx, plugins=self.make_plugins(self.model))


class QueryPromptStrategy(PromptStrategy):
    """A query-based baseline: ``make_prompts`` builds its ``LayerPrompts``, ``MODEL`` wraps them
    (with the ``trainable_head`` option's head layers, "none" without the option), and the task
    plugin drives its task boundaries."""

    MODEL: ClassVar[type[QueryPromptedModel]] = QueryPromptedModel

    def make_prompts(self, backbone: MulT, ctx: StrategyContext) -> LayerPrompts:
        raise NotImplementedError

    def make_model(self, backbone: MulT, ctx: StrategyContext) -> PromptedModel:
        head = self._values.get("trainable_head", "none")
        return self.MODEL(backbone, self.make_prompts(backbone, ctx), head)

    def make_plugins(self, model: Any) -> list[Any]:
        return [make_task_plugin(model)]


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


def missing_or_every(presence: Tensor, complete: float = 1.0) -> Tensor:
    """(B, M) per-modality weights from the presence mask (B, M): 1 for each missing modality, 0
    for a present one, and ``complete`` for every modality of a sample with none missing. What a
    sample's prompts stand in for: MemPrompt sums the shared prompts of these modalities (1),
    AOEPT weighs its modality prompts by them (1/M for a complete sample)."""
    missing = (presence < 0.5).to(presence.dtype)
    none_missing = missing.sum(dim=1, keepdim=True) == 0
    return torch.where(none_missing, torch.full_like(missing, complete), missing)


# (target, source, cross-modal layer) -> (B, L_source, d) key/value tokens.
SiteTokens = dict[tuple[str, str, int], Tensor]
# (modality, layer) -> (B, d) pooled tokens of that modality at that layer.
PooledTokens = dict[tuple[str, int], Tensor]


class HoldsCrossOutputs(Protocol):
    """A method's per-batch state that keeps the cross-modal transformers' outputs."""

    cross_outputs: dict[tuple[str, str], Tensor]


def run_recording_cross_outputs(backbone: MulT, x: Tensor, holder: HoldsCrossOutputs) -> Tensor:
    """The backbone's output on ``x``. While it runs, ``holder.cross_outputs`` is the live
    recording of the cross-modal transformers' outputs, (target, source) -> (B, L, d), complete
    before any memory transformer asks for its prompt; afterwards it is a copy, so that later
    passes (frozen ones for an auxiliary loss) cannot overwrite it."""
    with backbone.recording() as recording:
        holder.cross_outputs = recording.cross_outputs
        output = backbone(x)
    holder.cross_outputs = dict(recording.cross_outputs)
    return output


def per_source_prefix(weights: Tensor, prompt: Tensor) -> Tensor:
    """(B, L, n d): a memory transformer's prefix made of the same (L, d) ``prompt`` once per
    source, each scaled by that source's (B, n) weight; the memory width holds one slice of d
    features per source."""
    slices = [weights[:, i, None, None] * prompt for i in range(weights.shape[1])]
    return torch.cat(slices, dim=2)


def frozen_site_tokens(backbone: MulT, x: Tensor, layers: Sequence[int]) -> SiteTokens:
    """The key/value tokens of every cross-modal transformer at ``layers``, for the packed input
    ``x``, from one prompt-free pass of the frozen backbone."""
    with backbone.recording() as recording:
        frozen_query(backbone, x)
    wanted = set(layers)
    return {key: tokens for key, tokens in recording.cross_key_values.items() if key[2] in wanted}


def mean_pooled_modality_tokens(
    tokens: SiteTokens, modalities: Sequence[str], layers: Sequence[int]
) -> PooledTokens:
    """(modality, layer) -> (B, d): that modality's tokens mean-pooled over time, averaged over
    the M-1 cross-modal transformers that read them at that layer."""
    pooled: PooledTokens = {}
    for source in modalities:
        for layer in layers:
            copies = [tokens[(t, source, layer)].mean(dim=1) for t in modalities if t != source]
            pooled[(source, layer)] = sum(copies[1:], copies[0]) / len(copies)
    return pooled
