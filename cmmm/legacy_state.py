"""Training state written before MulT's transformers were stacked, converted to today's names.

A checkpoint keeps the model's state dict (converted by ``MulT`` itself when it loads), the names
of the trainable parameters and the optimizer's per-parameter state under those names. In the
old layout every transformer had its own ``query``/``key``/``value``/... matrices; now member g of
a stack is row g of one parameter, and query, key and value are the three row blocks of
``in_proj_weight``. ``convert_training_state`` rewrites the names and stacks Adam's moments the
same way, so a run interrupted before the change resumes after it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from cmmm.backbone import MulT

# Full old parameter name -> (full new name, member, in_proj block or None).
LegacyMap = dict[str, tuple[str, int, int | None]]


def legacy_names(model: nn.Module) -> LegacyMap:
    """The old names of every stacked parameter of every ``MulT`` inside ``model``."""
    mapping: LegacyMap = {}
    for name, module in model.named_modules():
        if isinstance(module, MulT):
            prefix = f"{name}." if name else ""
            for old, (new, member, block) in module._legacy_keys.items():
                mapping[prefix + old] = (prefix + new, member, block)
    return mapping


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _place(target: Tensor, value: Tensor, member: int, block: int | None) -> None:
    row = target[member]
    if block is not None:
        row = row.split(row.shape[0] // 3, dim=0)[block]
    row.copy_(value)


def convert_training_state(model: nn.Module, state: dict[str, Any]) -> bool:
    """Rewrite ``state`` (a ``capture_template_state`` result) in place when it names old
    parameters; True if it did. The model's own state dict is converted when it is loaded."""
    mapping = legacy_names(model)
    optimizer = state.get("optimizer") or {}
    groups: list[list[str]] = optimizer.get("parameters") or []
    named = [*state.get("trainable", []), *(n for group in groups for n in group)]
    if not any(name in mapping for name in named):
        return False

    def new_name(name: str) -> str:
        return mapping[name][0] if name in mapping else name

    state["trainable"] = _unique([new_name(n) for n in state.get("trainable", [])])
    if not groups:
        return True
    parameters = dict(model.named_parameters())
    saved = optimizer["state_dict"]
    old_order = [name for group in groups for name in group]
    old_state = {old_order[int(index)]: value for index, value in saved["state"].items()}
    new_groups = [_unique([new_name(n) for n in group]) for group in groups]
    new_state: dict[int, dict[str, Any]] = {}
    index = 0
    for group_index, group in enumerate(new_groups):
        saved["param_groups"][group_index]["params"] = list(range(index, index + len(group)))
        for name in group:
            sources = [old for old in old_order if new_name(old) == name and old in old_state]
            if sources:
                entry: dict[str, Any] = {}
                for key, value in old_state[sources[0]].items():
                    if not isinstance(value, Tensor) or value.dim() == 0:
                        entry[key] = value  # Adam's step count: the same for every member
                        continue
                    if sources[0] not in mapping:
                        entry[key] = value
                        continue
                    stacked = torch.zeros_like(parameters[name], dtype=value.dtype)
                    for old in sources:
                        _, member, block = mapping[old]
                        _place(stacked, old_state[old][key], member, block)
                    entry[key] = stacked
                new_state[index] = entry
            index += 1
    saved["state"] = new_state
    optimizer["parameters"] = new_groups
    return True
