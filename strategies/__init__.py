"""The methods, one file each, registered by name in ``STRATEGIES``."""

from strategies import joint, naive  # noqa: F401  (registration)
from strategies.base import STRATEGIES, Strategy, StrategyContext

__all__ = ["STRATEGIES", "Strategy", "StrategyContext"]
