"""EWC (Kirkpatrick et al., 2017): Avalanche's ``EWC`` on the whole pre-trained MulT.

After each task Avalanche estimates a diagonal Fisher (mean squared gradient of the task loss
over the task's training mini-batches) and stores the parameters; while training later tasks it
adds ``ewc_lambda * sum_k F_k (theta - theta_k)^2`` to the loss, one term per past task in mode
``separate`` (the published form) or a single decayed term in mode ``online``.

Defaults: ``ewc_lambda = 1`` and mode ``separate``, as in Avalanche's reference reproduction of
EWC on Permuted MNIST (ContinualAI/continual-learning-baselines), a domain-incremental benchmark
like ours. The penalty scale depends on the loss (L1 on the regression streams), so sweep it.
"""

from __future__ import annotations

from typing import Any

from cmmm.errors import ConfigError
from cmmm.options import ConfigurableStrategy, Option
from cmmm.strategy import STRATEGIES, StrategyContext


@STRATEGIES.register("ewc", "EWC: fine-tune the whole MulT with a Fisher-weighted penalty")
class ElasticWeightConsolidation(ConfigurableStrategy):
    family = "ewc"
    OPTIONS = {
        "ewc_lambda": Option(1.0, float, "weight of the EWC penalty", minimum=0),
        "mode": Option(
            "separate",
            str,
            "one penalty per past task, or one decayed penalty",
            choices=("separate", "online"),
        ),
        "decay_factor": Option(
            None, float, "decay of past importances (mode online only)", minimum=0, nullable=True
        ),
    }

    def check(self) -> None:
        if self.opt("mode") == "online" and self.opt("decay_factor") is None:
            raise ConfigError("ewc: mode online needs decay_factor (e.g. -o decay_factor=0.9)")
        if self.opt("mode") == "separate" and self.opt("decay_factor") is not None:
            raise ConfigError("ewc: decay_factor is used only with mode online")

    def build(self, ctx: StrategyContext) -> Any:
        from avalanche.training import EWC

        return EWC(
            model=ctx.model,
            optimizer=ctx.adam(ctx.model.parameters()),
            ewc_lambda=self.opt("ewc_lambda"),
            mode=self.opt("mode"),
            decay_factor=self.opt("decay_factor"),
            **ctx.template_kwargs(),
        )
