"""Lowerbound: sequential fine-tuning of the whole pre-trained model, no continual mechanism."""

from __future__ import annotations

from typing import Any

from cmmm.strategy import STRATEGIES, Strategy, StrategyContext


@STRATEGIES.register("naive", "Lowerbound: fine-tune the whole MulT on each task in turn")
class NaiveFineTuning(Strategy):
    def build(self, ctx: StrategyContext) -> Any:
        from avalanche.training import Naive

        return Naive(
            model=ctx.model, optimizer=ctx.adam(ctx.model.parameters()), **ctx.template_kwargs()
        )
