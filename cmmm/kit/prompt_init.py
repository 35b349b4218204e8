"""Initialisers of prompt parameters, each as the reference code it follows draws it.

``uniform_parameter`` (``cmmm.kit.prompt_kit``) is the uniform one of L2P and its successors
(``rand_parameter`` here is MPLMM's uniform [0, 1)); the Gram-Schmidt initialisation of
CODA-Prompt's components is ``cmmm.kit.orthogonal``'s.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def normal_parameter(*shape: int, std: float = 0.02) -> nn.Parameter:
    """N(0, std^2), drawn as ``torch.randn(*shape) * std``: the prompt initialisation of the seed
    papers' code (MemPrompt's shared prompts; std 0.02)."""
    return nn.Parameter(torch.randn(*shape) * std)


def kaiming_parameter(*shape: int) -> nn.Parameter:
    """Kaiming-normal with a = sqrt(5) (``nn.init.kaiming_normal_``, fan-in of ``shape[1:]``):
    MemPrompt's code for its memory prompts and keys."""
    return nn.Parameter(nn.init.kaiming_normal_(torch.empty(*shape), a=math.sqrt(5)))


def rand_parameter(*shape: int) -> nn.Parameter:
    """U[0, 1), drawn as ``torch.rand(*shape)``: MPLMM's code for every prompt and map."""
    return nn.Parameter(torch.rand(*shape))
