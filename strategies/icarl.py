"""iCaRL (Rebuffi et al., 2017), in the form that fits a domain-incremental stream.

Herding-selected exemplars per (task, class) group (per task on regression streams) share a memory
of ``mem_size``; a task trains on its samples plus every exemplar, with the task loss plus
``alpha`` times the distillation of the previous model's outputs; prediction is by the nearest
mean of exemplars (``cmmm.kit.exemplars``) on classification streams, by the head on regression
ones.
How this differs from the class-incremental original, and the defaults:
docs/strategies.md#icarl.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cmmm.errors import ConfigError
from cmmm.kit.exemplars import (
    NearestMeanOfExemplars,
    dataset_features,
    exemplar_class_means,
    herding_order,
)
from cmmm.options import ConfigurableStrategy, Option
from cmmm.replay_sizes import MEM_SIZE, register_sized
from cmmm.strategy import StrategyContext


def icarl_plugin(mem_size: int, alpha: float, classification: bool, batch_size: int) -> Any:
    from avalanche.core import SupervisedPlugin

    class ICaRLPlugin(SupervisedPlugin):
        def __init__(self) -> None:
            super().__init__()
            # (task, class or None) -> AvalancheDataset of exemplars in herding order
            self.memory: dict[tuple[int, int | None], Any] = {}
            self.old_model: nn.Module | None = None

        def exemplar_count(self) -> int:
            return sum(len(d) for d in self.memory.values())

        def checkpoint_state(self, context: Any) -> dict[str, Any]:
            # Exemplars as the stream's sample keys, in herding order; the previous model's
            # weights (the class means live in the model's own state).
            return {
                "memory": [
                    {"task": task, "class": cls, "samples": context.samples.keys(exemplars)}
                    for (task, cls), exemplars in self.memory.items()
                ],
                "old_model": None if self.old_model is None else self.old_model.state_dict(),
            }

        def restore_checkpoint_state(self, state: dict[str, Any], context: Any) -> None:
            from cmmm.template_state import frozen_copy

            self.memory = {
                (group["task"], group["class"]): context.samples.dataset(group["samples"])
                for group in state["memory"]
            }
            saved = state["old_model"]
            backbone = context.template.model.backbone
            self.old_model = None if saved is None else frozen_copy(backbone, saved)

        def after_train_dataset_adaptation(self, strategy: Any, **kwargs: Any) -> None:
            if self.memory:
                for exemplars in self.memory.values():
                    strategy.adapted_dataset = strategy.adapted_dataset.concat(exemplars.train())

        def before_backward(self, strategy: Any, **kwargs: Any) -> None:
            if self.old_model is None or alpha == 0:
                return
            with torch.no_grad():
                old = self.old_model(strategy.mb_x)
            new = strategy.mb_output
            if classification:
                term = F.binary_cross_entropy_with_logits(new, torch.sigmoid(old))
            else:
                term = F.mse_loss(new, old)
            strategy.loss += alpha * term

        def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
            model = strategy.model
            was_training = model.training
            model.eval()
            dataset = strategy.experience.dataset
            features, targets, tasks = dataset_features(model, dataset, batch_size, strategy.device)
            new_groups: dict[tuple[int, int | None], torch.Tensor] = {}
            for task in tasks.unique().tolist():
                in_task = tasks == task
                if classification:
                    for cls in targets[in_task].unique().tolist():
                        new_groups[(int(task), int(cls))] = in_task & (targets == cls)
                else:
                    new_groups[(int(task), None)] = in_task
            quota = mem_size // (len(self.memory) + len(new_groups))
            for key in list(self.memory):  # reduce: keep the first exemplars of each group
                self.memory[key] = self.memory[key].subset(range(min(quota, len(self.memory[key]))))
            for key, mask in new_groups.items():  # construct, by herding
                indices = mask.nonzero().squeeze(1)
                order = herding_order(features[indices], quota)
                self.memory[key] = dataset.subset(indices[order].tolist())
            if classification and model.use_ncm:
                groups = self.memory.values()
                means = exemplar_class_means(model, groups, batch_size, strategy.device)
                model.ncm.replace_class_means_dict(means)
            self.old_model = copy.deepcopy(model.backbone).eval()
            for parameter in self.old_model.parameters():
                parameter.requires_grad_(False)
            model.train(was_training)

    return ICaRLPlugin()


@register_sized("icarl", "iCaRL: herding exemplars + distillation (+ nearest-mean classifier)")
class IncrementalClassifierRepresentation(ConfigurableStrategy):
    family = "icarl"
    OPTIONS = {
        "mem_size": MEM_SIZE,
        "alpha": Option(1.0, float, "weight of the distillation term", minimum=0),
        "classifier": Option(
            "auto",
            str,
            "ncm (nearest mean of exemplars), head, or auto (ncm on classification streams)",
            choices=("auto", "ncm", "head"),
        ),
    }

    def build(self, ctx: StrategyContext) -> Any:
        from avalanche.training import Naive

        classification = ctx.stream.dataset.task_type == "classification"
        if self.opt("classifier") == "ncm" and not classification:
            raise ConfigError("icarl: classifier=ncm needs a classification stream (no classes)")
        use_ncm = classification and self.opt("classifier") != "head"
        model = NearestMeanOfExemplars(ctx.model, use_ncm=use_ncm)
        kwargs = ctx.template_kwargs()
        kwargs["plugins"].append(
            icarl_plugin(
                self.opt("mem_size"), self.opt("alpha"), classification, ctx.eval_batch_size
            )
        )
        return Naive(model=model, optimizer=ctx.adam(model.parameters()), **kwargs)
