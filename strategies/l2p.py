"""L2P (Wang et al., CVPR 2022) on the frozen MulT, and the pieces the query-based prompt
baselines share (DualPrompt, S-Prompts and CODA-Prompt import them from here).

L2P: a pool of prompts, each with a learnable key. The query is the frozen backbone's pooled
feature of the input without any prompt (``MulT.forward_features``, 180-d for three modalities,
computed in eval mode and without gradient, as L2P's separate frozen "original model"). The top-N
keys by cosine similarity pick N prompts per sample, concatenated along the length; a pull term
``pull_lambda * mean_b sum_{j in top-N(b)} (1 - cos(q_b, k_j))`` is added to the loss (the same
gradient as the reference code's ``- coeff * sum(sim) / B``). Selection is per sample at training
and at test: the runner evaluates ``model(x)`` with no task label, so everything comes from x.

Published defaults and their sources:

* ``pool_size`` 10, ``prompt_length`` 5, ``top_k`` 5: the L2P paper's Split CIFAR-100 setting
  (Avalanche's ``LearningToPrompt`` uses a pool of 20). 5 x 5 = 25 prefix tokens per prompted
  layer, against 16 for the method (method.md); lower ``top_k`` or ``prompt_length`` to match.
* ``pull_lambda`` 0.1: l2p-pytorch's ``pull_constraint_coeff`` and Avalanche's
  ``sim_coefficient``.
* Prompts and keys initialised uniform(-1, 1): the reference code's "uniform" initialisers.
* ``trainable_head`` "out": L2P trains its linear classifier on top of the frozen encoder; the
  counterpart in MulT is ``out_layer`` (the last linear map of the residual head). "all" also
  trains ``proj1``/``proj2``; "none" trains the prompts and keys only.

Adaptations to MulT (which has no input tokens to prepend to, and six parallel cross-modal
transformers instead of one ViT):

* L2P prepends prompts to the input of the first layer. Here the selected prompts are prefix
  key/value tokens (the backbone's prompt hook) at the front cross-modal layer(s), ``layers``
  (default "0"): every cross-modal transformer attends to them. One pool serves all of them (a
  prompt is (L, d), d = 30); with several layers each pool entry has its own (L, d) per layer.
  The memory (self-attention) transformers get no prompt.
* Batch-wise selection (the most frequent prompts of the batch, an option of the reference code)
  is not offered: at test time it would let a batch's composition, i.e. its task, choose the
  prompts. The prompt-frequency penalty of the task-aware variant is not used either.
* Regression (MOSI, CH-SIMS) needs nothing special: the head's output and the runner's loss are
  used as they are; the pull term does not depend on the labels.
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
from strategies.base import STRATEGIES, StrategyContext
from strategies.options import ConfigurableStrategy, Option, parse_layers
from strategies.prompted_model import (
    TRAINABLE_HEADS,
    PromptedModel,
    make_prompt_template,
    set_requires_grad,
)

# ------------------------------------------------------------------------------------------------
# Shared by the query-based prompt baselines
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# L2P
# ------------------------------------------------------------------------------------------------


class L2PPrompts(LayerPrompts):
    """A pool of ``pool_size`` prompts ((layers, L, d) each) with keys of the query's width."""

    def __init__(
        self,
        layers: Sequence[int],
        pool_size: int,
        length: int,
        width: int,
        query_dim: int,
        top_k: int,
        pull_lambda: float,
    ) -> None:
        super().__init__()
        self.layers = tuple(layers)
        self.top_k = top_k
        self.pull_lambda = pull_lambda
        self.prompt = uniform_parameter(pool_size, len(self.layers), length, width)
        self.key = uniform_parameter(pool_size, query_dim)

    def select(self, query: Tensor, task: int | None) -> Selection:
        similarity = cosine_matrix(query, self.key)  # (B, pool)
        top = similarity.topk(self.top_k, dim=1)
        chosen = self.prompt[top.indices]  # (B, N, layers, L, d)
        batch = chosen.shape[0]
        prompts = {
            layer: chosen[:, :, i].reshape(batch, -1, chosen.shape[-1])  # (B, N*L, d)
            for i, layer in enumerate(self.layers)
        }
        pull = self.pull_lambda * (1.0 - top.values).sum(dim=1).mean()
        return Selection(prompts, pull, top.indices)


@STRATEGIES.register("l2p", "L2P: a prompt pool with learnable keys picked by the frozen query")
class LearningToPrompt(ConfigurableStrategy):
    family = "l2p"
    OPTIONS = {
        "pool_size": Option(10, int, "number of prompts in the pool", minimum=1),
        "prompt_length": Option(5, int, "tokens per prompt", minimum=1),
        "top_k": Option(5, int, "prompts selected per sample", minimum=1),
        "layers": Option("0", str, "cross-modal layers given the selected prompts"),
        "pull_lambda": Option(0.1, float, "weight of the key pull term", minimum=0),
        "trainable_head": trainable_head_option("out", "head layers trained with the prompts"),
    }

    def check(self) -> None:
        self.layers = normalise_layer_option(self, "layers")
        if self.opt("top_k") > self.opt("pool_size"):
            raise ConfigError(
                f"l2p: top_k ({self.opt('top_k')}) cannot exceed pool_size "
                f"({self.opt('pool_size')})"
            )

    def build(self, ctx: StrategyContext) -> Any:
        backbone = require_mult("l2p", ctx.model)
        check_layers_exist("l2p", "layers", self.layers, backbone.config.layers)
        prompts = L2PPrompts(
            self.layers,
            self.opt("pool_size"),
            self.opt("prompt_length"),
            backbone.config.d_model,
            backbone.feature_dim,
            self.opt("top_k"),
            self.opt("pull_lambda"),
        )
        model = QueryPromptedModel(backbone, prompts, self.opt("trainable_head"))
        self.model = model
        return make_prompt_template(model, ctx, plugins=[make_task_plugin(model)])
