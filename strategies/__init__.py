"""The methods, one file each, registered by name in ``STRATEGIES``."""

from strategies import agem, der, ewc, icarl, joint, lwf, naive, ours, replay, si  # noqa: F401
from strategies.base import STRATEGIES, Strategy, StrategyContext

__all__ = ["STRATEGIES", "Strategy", "StrategyContext"]
