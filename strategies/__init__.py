"""The methods, one file each, registered by name in ``STRATEGIES``."""

from strategies import (  # noqa: F401
    agem,
    codaprompt,
    der,
    dualprompt,
    ewc,
    icarl,
    joint,
    l2p,
    lwf,
    mplmm,
    naive,
    ours,
    replay,
    si,
    sprompts,
)
from strategies.base import STRATEGIES, Strategy, StrategyContext

__all__ = ["STRATEGIES", "Strategy", "StrategyContext"]
