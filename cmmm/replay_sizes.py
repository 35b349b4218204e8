"""The buffer sizes every replay-type baseline shares, and their registration by size.

Replay-type baselines (ER, A-GEM, iCaRL, DER++) take ``mem_size``, the total buffer size. They
are registered once per buffer size, ``<family>-<size>`` (``er-250``, ``er-500``, ``er-1000``),
so that a comparison lists them by name; ``paper_sizes`` and ``expand_family`` give the two
sizes method.md uses for a stream (MOSI and CH-SIMS 250 and 500, IEMOCAP 500 and 1000).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cmmm.errors import ConfigError
from cmmm.options import Option
from cmmm.strategy import STRATEGIES, Strategy

# method.md: "Replay buffers for replay baselines: 250 and 500 (MOSI, CH-SIMS), 500 and 1000
# (IEMOCAP)". Every registered family has one variant per size.
BUFFER_SIZES = (250, 500, 1000)
_REGRESSION_SIZES = (250, 500)
_CLASSIFICATION_SIZES = (500, 1000)
PAPER_SIZES_BY_STREAM: dict[str, tuple[int, int]] = {
    "mosi": _REGRESSION_SIZES,
    "mosi-pkl": _REGRESSION_SIZES,
    "sims": _REGRESSION_SIZES,
    "synthetic": _REGRESSION_SIZES,  # MOSI-like
    "iemocap": _CLASSIFICATION_SIZES,
    "synthetic-cls": _CLASSIFICATION_SIZES,  # IEMOCAP-like
}
# Families registered as <family>-<size>; filled by register_sized.
SIZED_FAMILIES: dict[str, str] = {}


BATCH_SIZE_MEM = Option(
    None,
    int,
    "buffer samples per mini-batch (None: the training batch size)",
    minimum=1,
    nullable=True,
)
MEM_SIZE = Option(500, int, "total replay buffer size (samples)", minimum=1)


def register_sized(family: str, description: str) -> Callable[[type[Strategy]], type[Strategy]]:
    """Register ``cls`` as ``<family>-<size>`` for every size in ``BUFFER_SIZES``.

    The size is fixed by the name: a ``mem_size`` option of another size is refused (construct
    the class directly for another size); the name's own size is accepted, so that the options a
    strategy reports (``results.json``'s) rebuild it. Every other option passes through.
    """

    def decorator(cls: type[Strategy]) -> type[Strategy]:
        SIZED_FAMILIES[family] = description

        def sized(size: int) -> Callable[..., Strategy]:
            def factory(**options: Any) -> Strategy:
                if options.get("mem_size", size) != size:
                    raise ConfigError(
                        f"{family}-{size}: the buffer size is fixed by the name; use one of "
                        f"{', '.join(f'{family}-{s}' for s in BUFFER_SIZES)}"
                    )
                rest = {k: v for k, v in options.items() if k != "mem_size"}
                return cls(mem_size=size, **rest)

            return factory

        for size in BUFFER_SIZES:
            STRATEGIES.register(f"{family}-{size}", f"{description}, buffer {size}")(sized(size))
        return cls

    return decorator


def paper_sizes(stream: str) -> tuple[int, int]:
    """The two buffer sizes method.md reports for a stream (MOSI/CH-SIMS-like by default)."""
    return PAPER_SIZES_BY_STREAM.get(stream, _REGRESSION_SIZES)


def expand_family(name: str, stream: str) -> list[str]:
    """``er`` -> ``['er-250', 'er-500']`` on MOSI (``['er-500', 'er-1000']`` on IEMOCAP).

    Any other name (a registered strategy, or a sized name such as ``er-1000``) is returned as is.
    """
    if name in SIZED_FAMILIES:
        return [f"{name}-{size}" for size in paper_sizes(stream)]
    return [name]
