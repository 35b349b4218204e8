"""iCaRL (Rebuffi et al., 2017), in the form that fits a domain-incremental stream.

Published iCaRL is class-incremental: herding-selected exemplars of each class (total memory
fixed), trained on new data plus exemplars with a sigmoid loss whose targets for *old classes*
are the previous model's outputs, and a nearest-mean-of-exemplars (NME) classifier. Avalanche's
``ICaRL`` assumes exactly that (``n_classes_per_exp``, ``classes_order``, one new set of classes
per experience). Here every task has every class (or one continuous label), so:

- Exemplar groups are (task, class) pairs on classification streams and tasks on regression
  streams; the memory of ``mem_size`` is split equally over the groups seen so far
  (``mem_size // groups`` each, never more in total), each group keeps its herding order (the
  samples whose mean L2-normalised MulT feature best tracks the group's mean), and shrinking a
  group keeps its first exemplars, as iCaRL's ReduceExemplarSet does.
- Training data of a task = its samples plus every exemplar, as in iCaRL.
- Loss = the task loss on labels (cross-entropy, or L1 for regression) + ``alpha`` times the
  distillation of the previous model's outputs on the same inputs. iCaRL replaces the targets
  of old classes by the old model's sigmoid outputs; with every class old after the first task
  that would drop the labels altogether, so the label term is kept and the distillation term is
  iCaRL's sigmoid binary cross-entropy against the old model's sigmoid outputs (classification)
  or the squared error between the new and old (B,) outputs (regression).
- Prediction: on classification streams the NME classifier (Avalanche's ``NCMClassifier``: the
  nearest L2-normalised class mean of the exemplars, pooled over tasks, in MulT feature space);
  on regression streams there are no classes to average, so predictions come from the network's
  head. ``classifier=head`` uses the head on classification streams too.

Defaults: ``alpha = 1`` (iCaRL weighs its distillation and label terms equally), classifier
``auto`` (NME on classification, head on regression).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from cmmm.errors import ConfigError
from cmmm.options import ConfigurableStrategy, Option
from cmmm.replay_sizes import MEM_SIZE, register_sized
from cmmm.strategy import StrategyContext


class NearestMeanOfExemplars(nn.Module):
    """MulT trained through its head; in eval mode, optionally the nearest exemplar class mean."""

    def __init__(self, backbone: nn.Module, use_ncm: bool) -> None:
        super().__init__()
        from avalanche.models import NCMClassifier

        self.backbone = backbone
        self.use_ncm = use_ncm
        self.ncm = NCMClassifier(normalize=True)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Any:
        # Avalanche's NCMClassifier registers its class_means buffer as None until it has means,
        # so a fresh model would refuse a state holding them ("unexpected key"); NCM's own loader
        # takes them (and rebuilds its class -> mean table) first.
        means = state_dict.get("ncm.class_means")
        if means is not None and self.ncm.class_means is None:
            self.ncm.load_state_dict({"class_means": means})
        return super().load_state_dict(state_dict, strict)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not self.use_ncm or self.ncm.class_means is None:
            return self.backbone(x)
        # (B, C) negative distances: the evaluator's argmax is the nearest mean.
        return self.ncm(self.features(x))


def herding_order(features: torch.Tensor, count: int) -> list[int]:
    """iCaRL's herding: indices whose running mean best approximates the mean feature."""
    normalised = F.normalize(features, dim=1)
    target = normalised.mean(dim=0)
    chosen: list[int] = []
    running = torch.zeros_like(target)
    available = torch.ones(len(normalised), dtype=torch.bool)
    for k in range(1, min(count, len(normalised)) + 1):
        distances = torch.linalg.vector_norm(target - (running + normalised) / k, dim=1)
        distances[~available] = float("inf")
        best = int(torch.argmin(distances))
        chosen.append(best)
        available[best] = False
        running += normalised[best]
    return chosen


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

        @torch.no_grad()
        def _features(self, model: Any, dataset: Any, device: Any) -> tuple[torch.Tensor, ...]:
            feats, targets, tasks = [], [], []
            for batch in DataLoader(dataset.eval(), batch_size=batch_size, shuffle=False):
                feats.append(model.features(batch[0].to(device)).cpu())
                targets.append(torch.as_tensor(batch[1]))
                tasks.append(torch.as_tensor(batch[-1]))
            return torch.cat(feats), torch.cat(targets), torch.cat(tasks)

        def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
            model = strategy.model
            was_training = model.training
            model.eval()
            dataset = strategy.experience.dataset
            features, targets, tasks = self._features(model, dataset, strategy.device)
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
                self._update_class_means(model, strategy.device)
            self.old_model = copy.deepcopy(model.backbone).eval()
            for parameter in self.old_model.parameters():
                parameter.requires_grad_(False)
            model.train(was_training)

        def _update_class_means(self, model: Any, device: Any) -> None:
            sums: dict[int, torch.Tensor] = {}
            counts: dict[int, int] = {}
            for exemplars in self.memory.values():
                if len(exemplars) == 0:
                    continue
                features, targets, _ = self._features(model, exemplars, device)
                normalised = F.normalize(features, dim=1)
                for cls in targets.unique().tolist():
                    rows = normalised[targets == cls]
                    sums[cls] = sums.get(cls, 0) + rows.sum(dim=0)
                    counts[cls] = counts.get(cls, 0) + len(rows)
            means = {int(c): F.normalize(sums[c] / counts[c], dim=0).to(device) for c in sums}
            model.ncm.replace_class_means_dict(means)

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
