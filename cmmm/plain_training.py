"""A plain PyTorch training loop over in-memory tensors.

Used for pre-training the backbone (not a continual step, so no Avalanche) and as the reference
the overhead benchmark compares Avalanche's loop against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cmmm.optimizers import adam


def train_epoch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    generator: torch.Generator,
) -> float:
    """One shuffled pass; returns the sample-weighted mean loss."""
    model.train()
    order = torch.randperm(len(y), generator=generator)
    total = 0.0
    for start in range(0, len(y), batch_size):
        idx = order[start : start + batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(idx)
    return total / len(y)


@torch.inference_mode()
def mean_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, criterion: nn.Module, batch_size: int = 512
) -> float:
    model.eval()
    total = 0.0
    for start in range(0, len(y), batch_size):
        total += float(
            criterion(model(x[start : start + batch_size]), y[start : start + batch_size])
        ) * len(y[start : start + batch_size])
    return total / len(y)


def fit(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    criterion: nn.Module,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    valid: tuple[torch.Tensor, torch.Tensor] | None = None,
    on_epoch: Callable[[int, float, float | None], None] | None = None,
) -> float | None:
    """Adam for ``epochs``; with ``valid``, keeps the weights of the best validation epoch.

    Returns the best validation loss (None without validation).
    """
    device = next(model.parameters()).device
    x, y = (t.to(device) for t in train)
    optimizer = adam([p for p in model.parameters() if p.requires_grad], lr)
    generator = torch.Generator().manual_seed(seed)
    best_loss, best_state = None, None
    for epoch in range(epochs):
        loss = train_epoch(model, x, y, criterion, optimizer, batch_size, generator)
        valid_loss = None
        if valid is not None:
            valid_loss = mean_loss(model, valid[0].to(device), valid[1].to(device), criterion)
            if best_loss is None or valid_loss < best_loss:
                best_loss = valid_loss
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if on_epoch is not None:
            on_epoch(epoch, loss, valid_loss)
    if best_state is not None:
        model.load_state_dict(best_state)
    return best_loss
