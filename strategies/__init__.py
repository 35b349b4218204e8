"""The methods, one file each, registered by name in ``STRATEGIES``."""

from strategies import (  # noqa: F401
    agem,
    aoept,
    codaprompt,
    der,
    dualprompt,
    ewc,
    icarl,
    joint,
    l2p,
    lwf,
    memprompt,
    mplmm,
    naive,
    ours,
    promma,
    replay,
    si,
    sprompts,
    zeroshot,
)
from strategies.base import STRATEGIES, Strategy, StrategyContext

__all__ = ["STRATEGIES", "Strategy", "StrategyContext"]
