"""DualPrompt (Wang et al., ECCV 2022) on the frozen MulT.

A G(eneral)-prompt shared by every task on the first layers and one E(xpert)-prompt per task,
with a learnable key, on the next layers, both attached as prefix tokens. Training on experience t
uses E-prompt t for every sample and pulls key t towards the query (``pull_lambda * mean_b
(1 - cos(q_b, k_t))``); at test each sample takes the E-prompt whose key is nearest (cosine) to
its query. The query is the frozen backbone's pooled feature without prompts (see ``cmmm.
prompt_kit.frozen_query``); no task label is used at test.

Published defaults and their sources (dualprompt-pytorch's Split CIFAR-100 configuration, which
follows the paper): G-prompt length 5 on layers 0-1, E-prompt length 5 on layers 2-4, one
E-prompt per task (the pool size is the number of tasks of the stream), ``pull_lambda`` 1.0
(``pull_constraint_coeff``), prompts and keys initialised uniform(-1, 1). ``trainable_head``
"out": DualPrompt trains its classifier, MulT's counterpart is ``out_layer``.

Adaptations to MulT:

* Layers are the cross-modal transformers' layers (MulT's default 5 layers: G on 0-1, E on 2-4,
  i.e. all of them). Every cross-modal transformer gets the same G-/E-prompt of a layer (one
  (L, d) per layer, d = 30); the memory transformers get none. A layer in both lists gets the
  G tokens followed by the E tokens.
* Prefix tuning proper gives separate key and value prefixes (the prompt split in two halves).
  The backbone's hook takes tokens that the frozen key and value projections of that layer map,
  so each prompt token serves as both key and value input (prefix tokens before the projections).
  There is therefore no key/value split, and the reference code's bug (a reshape without the
  permute when splitting selected prefixes across layers) cannot arise: every (task, layer) has
  its own parameter slice, indexed, never reshaped across the task/layer/length axes.
* Test-time candidates are the keys of the tasks trained so far (a key never trained is its
  random initialisation and cannot stand for a task); before any training every key counts.
* Regression needs nothing special (the pull term ignores labels).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from cmmm.backbone import MulT
from cmmm.kit.prompt_kit import (
    TRAINABLE_HEAD,
    LayerPrompts,
    QueryPromptStrategy,
    Selection,
    TaskPrompts,
    cosine_matrix,
    layers_option,
    uniform_parameter,
)
from cmmm.options import Option
from cmmm.strategy import STRATEGIES, StrategyContext


class DualPromptPrompts(TaskPrompts):
    """The G-prompt, and per task an E-prompt and its key (the part that trains with its task;
    the G-prompt is shared by all tasks and always trains)."""

    def __init__(self, backbone: MulT, num_tasks: int, options: Mapping[str, Any]) -> None:
        super().__init__(num_tasks)
        self.g_layers: tuple[int, ...] = options["g_layers"]
        self.e_layers: tuple[int, ...] = options["e_layers"]
        self.pull_lambda: float = options["pull_lambda"]
        width = backbone.config.d_model
        self.g_prompt = uniform_parameter(len(self.g_layers), options["g_length"], width)
        # One parameter per task, so that an old task's E-prompt and key can be frozen.
        e_shape = (len(self.e_layers), options["e_length"], width)
        self.e_prompt = nn.ParameterList(uniform_parameter(*e_shape) for _ in range(num_tasks))
        self.key = nn.ParameterList(
            uniform_parameter(backbone.feature_dim) for _ in range(num_tasks)
        )

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        return [self.e_prompt[task], self.key[task]]

    def nearest_task(self, query: Tensor) -> Tensor:
        """(B,) index of the nearest key (cosine) among the trained tasks' keys."""
        similarity = cosine_matrix(query, torch.stack(list(self.key)))
        if bool(self.trained.any()):
            similarity = similarity.masked_fill(~self.trained[None, :], float("-inf"))
        return similarity.argmax(dim=1)

    def select(self, query: Tensor, task: int | None) -> Selection:
        batch = query.shape[0]
        tasks = self.tasks_of(query, task)
        aux = None
        if task is not None:
            cos = cosine_matrix(query, self.key[task].unsqueeze(0))[:, 0]
            aux = self.pull_lambda * (1.0 - cos).mean()
        prompts: dict[int, Tensor] = {}
        for i, layer in enumerate(self.g_layers):
            prompts[layer] = self.g_prompt[i].unsqueeze(0).expand(batch, -1, -1)
        # (B, e_layers, L_e, d): one slice per (task, layer), indexed, never reshaped.
        e_prompts = self.per_sample(self.e_prompt, tasks, task)
        for i, layer in enumerate(self.e_layers):
            e = e_prompts[:, i]
            prompts[layer] = torch.cat([prompts[layer], e], dim=1) if layer in prompts else e
        return Selection(prompts, aux, tasks)


@STRATEGIES.register(
    "dualprompt", "DualPrompt: a shared G-prompt and per-task E-prompts picked by key at test"
)
class DualPrompt(QueryPromptStrategy):
    family = "dualprompt"
    OPTIONS = {
        "g_length": Option(5, int, "G-prompt tokens per layer", minimum=1),
        "g_layers": layers_option("0,1", "cross-modal layers of the G-prompt"),
        "e_length": Option(5, int, "E-prompt tokens per layer", minimum=1),
        "e_layers": layers_option("2,3,4", "cross-modal layers of the E-prompts"),
        "pull_lambda": Option(1.0, float, "weight of the key pull term", minimum=0),
        "trainable_head": TRAINABLE_HEAD,
    }
    LAYER_OPTIONS = ("g_layers", "e_layers")
    g_layers: tuple[int, ...]
    e_layers: tuple[int, ...]

    def make_prompts(self, backbone: MulT, ctx: StrategyContext) -> LayerPrompts:
        return DualPromptPrompts(backbone, self.task_count(ctx), self.settings())
