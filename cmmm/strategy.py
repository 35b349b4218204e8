"""What every strategy is: a named class that builds an Avalanche training template.

Every strategy shares the runner's loop over experiences and its evaluator (``cmmm.running``);
a strategy only says how to build the Avalanche template (which Avalanche strategy, which plugins,
which parameters train) and whether it trains on the stream one experience at a time or jointly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from cmmm.data.missing_stream import MissingModalityStream
from cmmm.errors import ConfigError
from cmmm.optimizers import adam
from cmmm.registry import Registry


@dataclass
class StrategyContext:
    """Everything the runner hands a strategy when it builds the template."""

    model: nn.Module
    stream: MissingModalityStream
    criterion: nn.Module
    epochs: int
    batch_size: int
    eval_batch_size: int
    lr: float
    device: torch.device
    plugins: list[Any] = field(default_factory=list)

    def adam(self, parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return adam(parameters, self.lr)

    def template_kwargs(self) -> dict[str, Any]:
        """Arguments every Avalanche template gets, identical across strategies."""
        import warnings

        from avalanche.training.plugins import EvaluationPlugin

        warnings.filterwarnings("ignore", message="No loggers specified", category=UserWarning)

        return {
            "criterion": self.criterion,
            "train_mb_size": self.batch_size,
            "train_epochs": self.epochs,
            "eval_mb_size": self.eval_batch_size,
            "device": self.device,
            "plugins": list(self.plugins),
            # Scoring is done by cmmm's own evaluator after each experience; Avalanche's default
            # evaluator would print and compute metrics that mean something else here.
            "evaluator": EvaluationPlugin(loggers=[]),
        }


class Strategy:
    """Base of every registered strategy. Subclasses set ``joint`` and implement ``build``."""

    # True: trained once on all experiences together (an upper bound), evaluated once.
    joint: ClassVar[bool] = False
    # False: the strategy trains nothing (the zero-shot reference); recorded in results.json.
    trains: ClassVar[bool] = True

    def __init__(self, **options: Any) -> None:
        if options:
            raise ConfigError(
                f"strategy {type(self).__name__} takes no options, got {sorted(options)}"
            )

    def build(self, ctx: StrategyContext) -> Any:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """Every option's value in effect (recorded in results.json)."""
        return {}

    def option_help(self) -> dict[str, str]:
        """What each option does, for `cmmm list strategies`."""
        return {}


StrategyFactory = Callable[..., Strategy]
STRATEGIES: Registry[StrategyFactory] = Registry("strategy", discover=True)
