"""``ours-compositional`` (not in the paper): the method with each missing case's task-specific
prompts composed from per-modality components.

``task_specific_form="compositional"``: the set of pattern k is the sum over modalities m of a
component C_m^present or C_m^missing (each M branches, L, d), so 2M components instead of
2^M - 1 sets serve every pattern, seen in training or not, and the parameters grow linearly in M.
``compositional_update``: "current" trains the M components of the current task (components are
shared, so old tasks can drift); "unused" trains only components no earlier task has trained and
freezes them afterwards (no drift, but later tasks may find nothing left to train but the shared
prompts).

The store registers itself in ``cmmm.kit.pattern_prompts.TASK_SPECIFIC_STORES``, so ``ours`` with
``task_specific_form=compositional`` uses it too; the strategy is ``ours`` with that form and
``unseen_patterns="own"`` (an unseen pattern's set is composed from trained components), looked
up by name when it is made, so that this file does not import ``strategies.ours``.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from cmmm.data.patterns import Pattern
from cmmm.kit.pattern_prompts import (
    TASK_SPECIFIC_STORES,
    PatternOptions,
    PatternPrompts,
    PerPatternStore,
)
from cmmm.strategy import STRATEGIES, Strategy

STATES = ("present", "missing")


class CompositionalOptions(PatternOptions, Protocol):
    """What this store reads of the options besides the core's."""

    compositional_update: str


@TASK_SPECIFIC_STORES.register(
    "compositional", "summed per-modality present/missing components, 2M (not in the paper)"
)
class CompositionalStore(PerPatternStore):
    """``task_specific.audio_present``, ``task_specific.audio_missing``, ... and the buffer
    ``used`` of the prompt module."""

    def __init__(self, prompts: PatternPrompts, options: CompositionalOptions) -> None:
        # The per-pattern sets are drawn first and then replaced: the random stream, and so every
        # result, stays that of the runs recorded before this form had a file of its own.
        super().__init__(prompts, options)
        self.update = options.compositional_update
        prompts.task_specific = nn.ParameterDict()
        m = len(prompts.modalities)
        if options.use_task_specific:
            # A sum of M components: each drawn with std/sqrt(M) so the set's scale matches
            # a per-pattern set's.
            std = options.prompt_init_std / math.sqrt(m)
            for modality in prompts.modalities:
                for state in STATES:
                    prompts.task_specific[f"{modality}_{state}"] = nn.Parameter(
                        torch.randn(m, prompts.length, prompts.width) * std
                    )
        self.component_names = [
            f"{name}_{state}" for name in prompts.modalities for state in STATES
        ]
        # Which components an earlier task trained ("unused" mode): a buffer, so it is in the
        # state dict and survives a checkpoint and resume.
        prompts.register_buffer("used", torch.zeros(len(self.component_names), dtype=torch.bool))

    def components(self, pattern: Pattern) -> list[str]:
        return [
            f"{modality}_{'present' if present else 'missing'}"
            for modality, present in zip(self.prompts.modalities, pattern, strict=True)
        ]

    def all_sets(self) -> Tensor:
        sets = self.prompts.task_specific
        return torch.stack(
            [
                torch.stack([sets[c] for c in self.components(p)]).sum(dim=0)
                for p in self.prompts.patterns
            ]
        )

    def set_of(self, pattern: Pattern) -> Tensor:
        sets = self.prompts.task_specific
        return torch.stack([sets[c] for c in self.components(tuple(pattern))]).sum(0)

    def parameters_of(self, pattern: Pattern | None = None) -> list[nn.Parameter]:
        sets = self.prompts.task_specific
        if pattern is None or not sets:
            return list(sets.values())
        return [sets[c] for c in self.components(tuple(pattern))]

    def trainable_for(self, pattern: Pattern) -> list[nn.Parameter]:
        sets = self.prompts.task_specific
        if not sets:
            return []
        names = self.components(tuple(pattern))
        if self.update == "unused":
            used = self.prompts.used
            names = [c for c in names if not used[self.component_names.index(c)]]
        return [sets[c] for c in names]

    def finished(self, pattern: Pattern) -> None:
        if self.update == "unused":
            for name in self.components(tuple(pattern)):
                self.prompts.used[self.component_names.index(name)] = True


@STRATEGIES.register(
    "ours-compositional",
    "The method with task-specific prompts composed from per-modality present/missing "
    "components (2M instead of 2^M - 1 sets; not in the paper)",
)
def ours_compositional(**options: Any) -> Strategy:
    """``ours`` with this form, ``unseen_patterns="own"`` and a frozen shared head unless the
    options say otherwise: per-pattern output layers (ours' default) would bring back the
    2^M - 1 growth this form exists to avoid."""
    return STRATEGIES.get("ours").factory(
        **{
            "task_specific_form": "compositional",
            "unseen_patterns": "own",
            "trainable_head": "none",
            **options,
        }
    )
