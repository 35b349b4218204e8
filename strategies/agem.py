"""A-GEM (Chaudhry et al., 2019): Avalanche's ``AGEM`` on the whole pre-trained MulT.

After each task a random ``patterns_per_exp`` of its training samples join the episodic memory.
Before each update the gradient of the loss on a random memory sample of ``sample_size`` (drawn
equally from every past task) is the reference; when the current gradient points against it
(negative dot product) it is projected onto the half-space where the reference loss does not
increase.

``mem_size`` is the total memory, as for the other replay baselines: by default each task keeps
``mem_size // number of tasks`` samples (35 of the 250, 71 of the 500, 142 of the 1000 on seven
tasks), so the memory never exceeds ``mem_size``; ``patterns_per_exp`` overrides it.
``sample_size = 256``: A-GEM's published reference batch, and Avalanche's reproduction on
Permuted MNIST (ContinualAI/continual-learning-baselines).
"""

from __future__ import annotations

from typing import Any

from cmmm.errors import ConfigError
from cmmm.options import ConfigurableStrategy, Option
from cmmm.replay_sizes import MEM_SIZE, register_sized
from cmmm.strategy import StrategyContext


@register_sized("agem", "A-GEM: fine-tune the whole MulT, projecting against a replay gradient")
class AveragedGEM(ConfigurableStrategy):
    family = "agem"
    OPTIONS = {
        "mem_size": MEM_SIZE,
        "patterns_per_exp": Option(
            None,
            int,
            "memory samples kept per task (None: mem_size // tasks)",
            minimum=1,
            nullable=True,
        ),
        "sample_size": Option(256, int, "memory samples per reference gradient", minimum=1),
    }

    def patterns_per_exp(self, num_tasks: int) -> int:
        explicit = self.opt("patterns_per_exp")
        if explicit is not None:
            return explicit
        per_task = self.opt("mem_size") // num_tasks
        if per_task < 1:
            raise ConfigError(
                f"agem: mem_size {self.opt('mem_size')} is smaller than the {num_tasks} tasks"
            )
        return per_task

    def build(self, ctx: StrategyContext) -> Any:
        from avalanche.training import AGEM

        # Recorded in results.json as the value actually used.
        self._values["patterns_per_exp"] = self.patterns_per_exp(len(ctx.stream.tasks))
        return AGEM(
            model=ctx.model,
            optimizer=ctx.adam(ctx.model.parameters()),
            patterns_per_exp=self.opt("patterns_per_exp"),
            sample_size=self.opt("sample_size"),
            **ctx.template_kwargs(),
        )
