"""A head per task: copies of MulT's head layers for prompt methods that give every task (domain)
its own classifier, such as S-Prompts.

``TaskHeads`` holds, per task, copies of the head layers that ``TRAINABLE_HEADS`` names for an
option value ("out": ``out_layer``; "all": ``proj1``, ``proj2`` and ``out_layer``; "none": no
copy, the frozen shared head), initialised from the pre-trained layers: a random head would throw
away the pre-trained read-out, and regression streams have a single output. ``output`` sends
each sample through its task's head, MulT's residual MLP head with the copied layers in place of
the backbone's.
"""

from __future__ import annotations

import copy

import torch.nn.functional as F
from torch import Tensor, nn

from cmmm.backbone import MulT
from cmmm.prompted_model import TRAINABLE_HEADS, set_requires_grad


class TaskHeads(nn.ModuleList):
    """Per task, a ``ModuleDict`` of copies of the head layers ``TRAINABLE_HEADS[copied]``, all
    trainable (the owner freezes the tasks that are not training)."""

    def __init__(self, backbone: MulT, num_tasks: int, copied: str) -> None:
        names = TRAINABLE_HEADS[copied]
        super().__init__(
            nn.ModuleDict({name: copy.deepcopy(getattr(backbone, name)) for name in names})
            for _ in range(num_tasks)
        )
        self.copied = copied
        for head in self:
            set_requires_grad(head.parameters(), True)

    def layer(self, task: int, name: str, backbone: MulT) -> nn.Module:
        """Task ``task``'s copy of the head layer ``name``, or the backbone's when not copied."""
        head = self[task]
        return head[name] if name in head else getattr(backbone, name)

    def output(self, features: Tensor, tasks: Tensor, backbone: MulT, training: bool) -> Tensor:
        """(B, output_dim): each sample's pooled ``features`` through the head of its task in
        ``tasks`` (B,); dropout as in MulT's head when ``training``."""
        if self.copied == "none":
            return backbone.head(features)
        outputs = features.new_zeros(len(features), backbone.config.output_dim)
        for task in tasks.unique().tolist():
            rows = (tasks == task).nonzero().squeeze(1)
            f = features[rows]
            proj1, proj2, out_layer = (
                self.layer(task, name, backbone) for name in TRAINABLE_HEADS["all"]
            )
            hidden = F.dropout(F.relu(proj1(f)), backbone.config.out_dropout, training)
            outputs = outputs.index_copy(0, rows, out_layer(proj2(hidden) + f))
        return outputs
