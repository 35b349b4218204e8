"""The methods, one file each, registered by name in ``cmmm.strategy.STRATEGIES``.

``cmmm.discovery.load_plugins`` imports every module here; nothing needs listing. The names below
are re-exported from the core for code that imports them from ``strategies``.
"""

from cmmm.strategy import STRATEGIES, Strategy, StrategyContext

__all__ = ["STRATEGIES", "Strategy", "StrategyContext"]
