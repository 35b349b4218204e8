"""DER++ (Buzzega et al., 2020): Avalanche's ``DER`` with ``alpha > 0`` and ``beta > 0``.

Mini-batches join ``batch_size_mem`` buffer samples to the new ones; the loss is the task loss on
the new samples, plus ``alpha * MSE(outputs on buffer samples, outputs stored when they entered
the buffer)``, plus ``beta * task loss on the buffer samples`` (the "++"; ``beta = 0`` is DER).

Two changes make it fit both kinds of stream, with Avalanche's code otherwise unchanged:

- The two label terms use the run's task criterion (cross-entropy on IEMOCAP, as Avalanche
  hard-codes; L1 on MOSI and CH-SIMS, where Avalanche's ``F.cross_entropy`` on a (B,) output
  silently computes something meaningless).
- On regression streams the stored "logits" are the model's (B,) outputs and the matching term
  is the MSE between outputs, which Avalanche's ``F.mse_loss`` already computes; the buffer is one
  reservoir over the whole stream (DER's published buffer) instead of Avalanche's class-balanced
  reservoirs, whose classes would be ``int(label)`` bins of a continuous label. Classification
  streams keep Avalanche's class-balanced buffer (every class is in every task here).

``eval_mb_size`` comes from the run (Avalanche's default of 1 is slow). Defaults
``alpha = 0.1``, ``beta = 0.5``: Avalanche's defaults for ``DER``; ``batch_size_mem`` defaults to
the training batch size, as in Avalanche.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F

from cmmm.options import ConfigurableStrategy, Option
from cmmm.replay_sizes import BATCH_SIZE_MEM, MEM_SIZE, register_sized
from cmmm.strategy import StrategyContext


def reservoir_buffer_with_outputs(max_size: int) -> Any:
    """One reservoir (uniform over every sample seen) that also stores the model's outputs."""
    from avalanche.benchmarks.utils import make_avalanche_dataset
    from avalanche.benchmarks.utils.data_attribute import TensorDataAttribute
    from avalanche.benchmarks.utils.flat_data import FlatData
    from avalanche.training.storage_policy import ReservoirSamplingBuffer
    from avalanche.training.supervised.der import (
        ClassBalancedBufferWithLogits,
        compute_dataset_logits,
    )

    class ReservoirBufferWithOutputs(ClassBalancedBufferWithLogits):
        def update(self, strategy: Any, **kwargs: Any) -> None:
            new_data = strategy.experience.dataset
            outputs = compute_dataset_logits(
                new_data.eval(),
                strategy.model,
                strategy.train_mb_size,
                strategy.device,
                num_workers=kwargs.get("num_workers", 0),
            )
            with_outputs = make_avalanche_dataset(
                new_data,
                data_attributes=[
                    TensorDataAttribute(
                        FlatData([outputs], discard_elements_not_in_indices=True),
                        name="logits",
                        use_in_getitem=True,
                    )
                ],
            )
            if 0 not in self.buffer_groups:
                self.buffer_groups[0] = ReservoirSamplingBuffer(self.max_size)
            self.buffer_groups[0].update_from_dataset(with_outputs)

    return ReservoirBufferWithOutputs(max_size, adaptive_size=True)


def der_with_task_loss(**kwargs: Any) -> Any:
    """Avalanche's ``DER`` whose label terms use the template's criterion."""
    from avalanche.training import DER

    class DERWithTaskLoss(DER):
        def training_epoch(self, **kw: Any) -> None:
            # The generic SGD loop; the DER loss is in criterion() below.
            super(DER, self).training_epoch(**kw)

        def criterion(self) -> Any:
            if not self.is_training or self.replay_loader is None:
                return self._criterion(self.mb_output, self.mb_y)
            m = self.batch_size_mem
            return (
                self._criterion(self.mb_output[m:], self.mb_y[m:])
                + self.alpha * F.mse_loss(self.mb_output[:m], self.batch_logits)
                + self.beta * self._criterion(self.mb_output[:m], self.mb_y[:m])
            )

    return DERWithTaskLoss(**kwargs)


@register_sized("der", "DER++: fine-tune the whole MulT replaying labels and stored outputs")
class DarkExperienceReplay(ConfigurableStrategy):
    family = "der"
    OPTIONS = {
        "mem_size": MEM_SIZE,
        "alpha": Option(0.1, float, "weight of the stored-output (logit) matching", minimum=0),
        "beta": Option(0.5, float, "weight of the buffer label loss (0: plain DER)", minimum=0),
        "batch_size_mem": BATCH_SIZE_MEM,
    }

    def build(self, ctx: StrategyContext) -> Any:
        template = der_with_task_loss(
            model=ctx.model,
            optimizer=ctx.adam(ctx.model.parameters()),
            mem_size=self.opt("mem_size"),
            batch_size_mem=self.opt("batch_size_mem"),
            alpha=self.opt("alpha"),
            beta=self.opt("beta"),
            **ctx.template_kwargs(),
        )
        if ctx.stream.dataset.task_type != "classification":
            template.storage_policy = reservoir_buffer_with_outputs(self.opt("mem_size"))
        return template
