"""Zero-shot reference: the pre-trained backbone evaluated on every task, trained on none.

It is the starting point every method shares (the backbone pre-trained with all modalities
present, ``cmmm.pretraining``), so "AA above zero-shot" is what a method gained by continual
training. Like joint training it is one step with a single row in the accuracy matrix (FM and BWT
are undefined); unlike it, that step trains nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cmmm.strategy import STRATEGIES, Strategy, StrategyContext


class EvaluationOnly:
    """A template whose ``train`` leaves the model as it is.

    It has what the runner and its checkpoints read from a template: the model (every parameter
    frozen, so the run reports 0 trainable parameters), an optimizer over the model's parameters
    that never steps, the plugins, the device.
    """

    def __init__(self, model: nn.Module, plugins: list[Any], device: torch.device) -> None:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        self.plugins = plugins
        self.device = device

    def train(self, experience: Any) -> None:
        """Nothing to learn: the zero-shot model is the pre-trained one."""


@STRATEGIES.register(
    "zeroshot", "Reference: the pre-trained MulT evaluated on every task, trained on none"
)
class ZeroShot(Strategy):
    joint = True  # one evaluation step, a one-row accuracy matrix
    trains = False

    def build(self, ctx: StrategyContext) -> Any:
        return EvaluationOnly(ctx.model, list(ctx.plugins), ctx.device)
