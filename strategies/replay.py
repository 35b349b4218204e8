"""ER (experience replay), and the buffer sizes every replay-type baseline shares.

Replay-type baselines (ER, A-GEM, iCaRL, DER++) take ``mem_size``, the total buffer size. They
are registered once per buffer size, ``<family>-<size>`` (``er-250``, ``er-500``, ``er-1000``),
so that a comparison lists them by name; ``paper_sizes`` and ``expand_family`` give the two
sizes method.md uses for a stream (MOSI and CH-SIMS 250 and 500, IEMOCAP 500 and 1000).

ER: Avalanche's ``ReplayPlugin`` on a whole-model fine-tuning template, i.e. exactly
``avalanche.training.Replay``, with its experience-balanced reservoir buffer (the memory is split
equally over the experiences seen so far; each part is a uniform sample of its experience) and
mini-batches of ``batch_size`` new plus ``batch_size_mem`` buffer samples.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cmmm.errors import ConfigError
from strategies.base import STRATEGIES, Strategy, StrategyContext
from strategies.options import ConfigurableStrategy, Option

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

    The size is fixed by the name: a ``mem_size`` option on such a name is refused (construct the
    class directly for another size). Every other option passes through.
    """

    def decorator(cls: type[Strategy]) -> type[Strategy]:
        SIZED_FAMILIES[family] = description

        def sized(size: int) -> Callable[..., Strategy]:
            def factory(**options: Any) -> Strategy:
                if "mem_size" in options:
                    raise ConfigError(
                        f"{family}-{size}: the buffer size is fixed by the name; use one of "
                        f"{', '.join(f'{family}-{s}' for s in BUFFER_SIZES)}"
                    )
                return cls(mem_size=size, **options)

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


def experience_balanced_buffer(mem_size: int) -> Any:
    """Avalanche's ``ExperienceBalancedBuffer`` (ReplayPlugin's default), minus a warning.

    Avalanche 0.6's ReplayPlugin calls the buffer's deprecated ``update``, which re-installs a
    warning filter on every call (so it cannot be silenced); this ``update`` does the same work.
    """
    from avalanche.training.storage_policy import ExperienceBalancedBuffer

    class Buffer(ExperienceBalancedBuffer):
        def update(self, strategy: Any, **kwargs: Any) -> None:
            self.post_adapt(strategy, strategy.experience)

    return Buffer(max_size=mem_size, adaptive_size=True)


@register_sized("er", "ER: whole-model fine-tuning with an experience-balanced replay buffer")
class ExperienceReplay(ConfigurableStrategy):
    family = "er"
    OPTIONS = {
        "mem_size": MEM_SIZE,
        "batch_size_mem": BATCH_SIZE_MEM,
        "task_balanced_dataloader": Option(
            False, bool, "draw the buffer part of a batch equally from every seen experience"
        ),
    }

    def build(self, ctx: StrategyContext) -> Any:
        from avalanche.training import Naive
        from avalanche.training.plugins import ReplayPlugin

        kwargs = ctx.template_kwargs()
        kwargs["plugins"].append(
            ReplayPlugin(
                mem_size=self.opt("mem_size"),
                storage_policy=experience_balanced_buffer(self.opt("mem_size")),
                batch_size_mem=self.opt("batch_size_mem"),
                task_balanced_dataloader=self.opt("task_balanced_dataloader"),
            )
        )
        return Naive(model=ctx.model, optimizer=ctx.adam(ctx.model.parameters()), **kwargs)
