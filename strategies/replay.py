"""ER (experience replay).

ER: Avalanche's ``ReplayPlugin`` on a whole-model fine-tuning template, i.e. exactly
``avalanche.training.Replay``, with its experience-balanced reservoir buffer (the memory is split
equally over the experiences seen so far; each part is a uniform sample of its experience) and
mini-batches of ``batch_size`` new plus ``batch_size_mem`` buffer samples. Its buffer sizes and
registration by size (``er-250``...) are ``cmmm.replay_sizes``'.
"""

from __future__ import annotations

from typing import Any

from cmmm.options import ConfigurableStrategy, Option
from cmmm.replay_sizes import BATCH_SIZE_MEM, MEM_SIZE, register_sized
from cmmm.strategy import StrategyContext


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
