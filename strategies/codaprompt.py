"""CODA-Prompt (Smith et al., CVPR 2023) on the frozen MulT.

At every prompted layer the prompt is a weighted sum of learnable components,
``P(q) = sum_j alpha_j(q) P_j`` with ``alpha_j = cos(q (.) A_j, K_j)``: q the query (the frozen
backbone's pooled feature without prompts), A_j an attention vector and K_j a key, all learnable.
The component pool is split into equal slices, one per task. Training task t uses slices 0..t;
the old slices 0..t-1 are frozen (``requires_grad`` False, then a new optimizer), and slice t is
(re)initialised by Gram-Schmidt at the start of task t: random vectors made orthonormal to every
earlier slice and to each other (for K, A and the flattened P). While training, an orthogonality
penalty ``ortho_mu * sum_layers sum_{B in K, A, P} mean((B B^T - I)^2)`` over slices 0..t is added
to the loss. At test the slices of every trained task are used; no task label is needed.

The Gram-Schmidt initialisation and the penalty are ``cmmm.kit.orthogonal``'s. Defaults, their
sources and the adaptations to MulT: docs/strategies.md#coda-prompt.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from cmmm.backbone import MulT
from cmmm.errors import ConfigError
from cmmm.kit.orthogonal import ortho_penalty, orthogonalise_slice_
from cmmm.kit.prompt_kit import (
    TRAINABLE_HEAD,
    LayerPrompts,
    QueryPromptStrategy,
    Selection,
    TaskPrompts,
    layers_option,
)
from cmmm.options import Option
from cmmm.strategy import STRATEGIES, StrategyContext


class CodaPrompts(TaskPrompts):
    """Per task slice: components (layers, n, L, d), keys and attention vectors (layers, n, q)."""

    def __init__(
        self, backbone: MulT, num_tasks: int, per_task: int, options: Mapping[str, Any]
    ) -> None:
        super().__init__(num_tasks)
        self.layers: tuple[int, ...] = options["layers"]
        self.per_task = per_task
        self.ortho_mu: float = options["ortho_mu"]
        n_layers, query_dim = len(self.layers), backbone.feature_dim
        component = (n_layers, per_task, options["prompt_length"], backbone.config.d_model)
        # Created uniform(0, 1) as the reference code's tensor_prompt; every slice is replaced by
        # its Gram-Schmidt initialisation when its task starts.
        self.components = nn.ParameterList(
            nn.Parameter(torch.rand(*component)) for _ in range(num_tasks)
        )
        self.keys = nn.ParameterList(
            nn.Parameter(torch.rand(n_layers, per_task, query_dim)) for _ in range(num_tasks)
        )
        self.attention = nn.ParameterList(
            nn.Parameter(torch.rand(n_layers, per_task, query_dim)) for _ in range(num_tasks)
        )

    def active_slices(self, task: int | None) -> int:
        """How many slices a forward uses: 0..task while training task, else every trained one
        (slice 0 before any training)."""
        if task is not None:
            return task + 1
        trained = self.trained.nonzero()
        return int(trained.max()) + 1 if len(trained) else 1

    def stacked(self, count: int) -> tuple[Tensor, Tensor, Tensor]:
        """Components (layers, n, L, d), keys and attention (layers, n, q) of slices 0..count-1."""
        return (
            torch.cat(list(self.components[:count]), dim=1),
            torch.cat(list(self.keys[:count]), dim=1),
            torch.cat(list(self.attention[:count]), dim=1),
        )

    def weights(self, query: Tensor, keys: Tensor, attention: Tensor) -> Tensor:
        """(B, n) alpha = cos(q (.) A_j, K_j) for one layer's keys and attention (n, q)."""
        attended = torch.nn.functional.normalize(query[:, None, :] * attention[None], dim=2)
        return (attended * torch.nn.functional.normalize(keys, dim=1)[None]).sum(dim=2)

    def select(self, query: Tensor, task: int | None) -> Selection:
        components, keys, attention = self.stacked(self.active_slices(task))
        prompts = {}
        for i, layer in enumerate(self.layers):
            alpha = self.weights(query, keys[i], attention[i])
            prompts[layer] = torch.einsum("bn,nld->bld", alpha, components[i])
        aux = None
        if task is not None and self.ortho_mu > 0:
            aux = query.new_zeros(())
            for i in range(len(self.layers)):
                aux = aux + ortho_penalty(keys[i]) + ortho_penalty(attention[i])
                aux = aux + ortho_penalty(components[i].flatten(1))
            aux = self.ortho_mu * aux
        return Selection(prompts, aux, None)

    def begin_task(self, task: int) -> None:
        for group in (self.components, self.keys, self.attention):
            orthogonalise_slice_(group, task)
        super().begin_task(task)

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        return [self.components[task], self.keys[task], self.attention[task]]


@STRATEGIES.register(
    "codaprompt", "CODA-Prompt: attention-weighted prompt components, sliced and frozen per task"
)
class CodaPrompt(QueryPromptStrategy):
    family = "codaprompt"
    OPTIONS = {
        "pool_size": Option(100, int, "prompt components over all tasks", minimum=1),
        "prompt_length": Option(8, int, "tokens per prompt", minimum=1),
        "layers": layers_option("0,1,2,3,4", "cross-modal layers given a prompt"),
        "ortho_mu": Option(0.1, float, "weight of the orthogonality penalty", minimum=0),
        "trainable_head": TRAINABLE_HEAD,
    }

    def make_prompts(self, backbone: MulT, ctx: StrategyContext) -> LayerPrompts:
        num_tasks = len(ctx.stream.tasks)
        per_task = self.opt("pool_size") // max(num_tasks, 1)
        if per_task < 1:
            raise ConfigError(
                f"codaprompt: pool_size {self.opt('pool_size')} gives no component to each of "
                f"{num_tasks} tasks"
            )
        # Gram-Schmidt draws no more orthogonal rows than there are dimensions: those of the
        # query (keys, attention) and of a flattened (L, d) component.
        width, query_dim = backbone.config.d_model, backbone.feature_dim
        room = min(query_dim, self.opt("prompt_length") * width)
        if per_task * num_tasks > room:
            raise ConfigError(
                f"codaprompt: {per_task * num_tasks} components do not fit the Gram-Schmidt "
                f"initialisation in {room} dimensions (min of the query width {query_dim} and "
                f"prompt_length * d); lower pool_size"
            )
        return CodaPrompts(backbone, num_tasks, per_task, self.settings())
