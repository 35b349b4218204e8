"""Upperbound: i.i.d. training of the whole model on the union of every task's data."""

from __future__ import annotations

from typing import Any

from cmmm.strategy import STRATEGIES, Strategy, StrategyContext


@STRATEGIES.register("joint", "Upperbound: train the whole MulT once on all tasks together")
class JointUpperbound(Strategy):
    joint = True

    def build(self, ctx: StrategyContext) -> Any:
        from avalanche.training import JointTraining

        return JointTraining(
            model=ctx.model, optimizer=ctx.adam(ctx.model.parameters()), **ctx.template_kwargs()
        )
