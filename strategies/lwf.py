"""LwF, Learning without Forgetting (Li & Hoiem, 2017): Avalanche's ``LwFPlugin``.

While training task t the loss gains ``alpha * D(new outputs, outputs of the model as it was
after task t-1)`` on the current task's inputs; no old data is stored.

- Classification (IEMOCAP): Avalanche's own distillation, KL divergence between the
  temperature-softened softmaxes over the classes seen so far (all of them here: every task has
  every class). This works with our benchmark (its experiences carry task labels).
- Regression (MOSI, CH-SIMS): the model outputs one number per sample, (B,), for which a softmax
  is meaningless (Avalanche's code indexes ``out[:, classes]`` and fails). The distillation
  becomes the squared error between the new and the previous model's outputs,
  ``alpha * mean((f(x) - f_prev(x))^2)``: the form knowledge distillation takes for regression
  outputs (as DER's logit matching and Shmelkov et al.'s incremental detectors do for box
  regression). ``temperature`` plays no part there and is only recorded.

One change from Avalanche on both: the teacher (the previous model) is put in eval mode, so its
targets are the deterministic outputs Li & Hoiem record, not dropout-perturbed ones.

Defaults ``alpha = 1``, ``temperature = 2``: Li & Hoiem's lambda_o = 1 and T = 2 (also
Avalanche's ``LwFPlugin`` defaults).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from cmmm.options import ConfigurableStrategy, Option
from cmmm.strategy import STRATEGIES, StrategyContext


def output_distillation(alpha: float, temperature: float, regression: bool) -> Any:
    """Avalanche's LwF regulariser with an eval-mode teacher and an L2 form for (B,) outputs.

    Built on first use so that importing the strategies does not import Avalanche.
    """
    from avalanche.training.regularization import LearningWithoutForgetting

    class OutputDistillation(LearningWithoutForgetting):
        def _lwf_penalty(self, out: torch.Tensor, x: torch.Tensor, curr_model: Any) -> Any:
            if self.prev_model is None:
                return 0
            if regression:
                with torch.no_grad():
                    previous = self.prev_model(x)
                return F.mse_loss(out, previous)
            return super()._lwf_penalty(out, x, curr_model)

        def post_adapt(self, agent: Any, exp: Any) -> None:
            if regression:
                # No classes to track: the whole (B,) output is distilled.
                self.expcount += 1
                self.prev_model = copy.deepcopy(agent.model)
            else:
                super().post_adapt(agent, exp)
            self.prev_model.eval()
            for parameter in self.prev_model.parameters():
                parameter.requires_grad_(False)

    return OutputDistillation(alpha=alpha, temperature=temperature)


@STRATEGIES.register("lwf", "LwF: fine-tune the whole MulT, distilling the previous model")
class LearningWithoutForgettingStrategy(ConfigurableStrategy):
    family = "lwf"
    OPTIONS = {
        "alpha": Option(1.0, float, "weight of the distillation term", minimum=0),
        "temperature": Option(
            2.0, float, "softmax temperature (classification only)", minimum=1e-6
        ),
    }

    def build(self, ctx: StrategyContext) -> Any:
        from avalanche.training import Naive
        from avalanche.training.plugins import LwFPlugin

        plugin = LwFPlugin(alpha=self.opt("alpha"), temperature=self.opt("temperature"))
        plugin.lwf = output_distillation(
            self.opt("alpha"),
            self.opt("temperature"),
            regression=ctx.stream.dataset.task_type != "classification",
        )
        kwargs = ctx.template_kwargs()
        kwargs["plugins"].append(plugin)
        # Naive + LwFPlugin is exactly avalanche.training.LwF.
        return Naive(model=ctx.model, optimizer=ctx.adam(ctx.model.parameters()), **kwargs)
