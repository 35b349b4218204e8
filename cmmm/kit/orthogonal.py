"""Orthogonal prompt components: a new task's slice drawn orthogonal to the earlier tasks' slices,
and the penalty that keeps a set of rows orthonormal while they train (CODA-Prompt's
Gram-Schmidt initialisation and orthogonality loss), and the penalty that keeps several prompts
out of each other's span (``pairwise_ortho_penalty``).

Per-task parameters here are lists of tensors, one slice per task, each (groups, n, ...): a group
(a prompted layer) holds n rows, each row the flattening of the trailing dimensions. A group's
rows are kept orthogonal to the same group's rows of every earlier slice.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from cmmm.errors import ConfigError


def gram_schmidt_rows(
    previous: Tensor, count: int, generator: torch.Generator | None = None
) -> Tensor:
    """(count, D) random unit rows, orthogonal to every row of ``previous`` (N, D) and to each
    other (classical Gram-Schmidt with one re-orthogonalisation pass, in float64)."""
    dim = previous.shape[1]
    if previous.shape[0] + count > dim:
        raise ConfigError(
            f"Gram-Schmidt: {previous.shape[0]} + {count} vectors do not fit in {dim} dimensions"
        )
    basis: list[Tensor] = []
    if previous.shape[0]:
        # An orthonormal basis of the earlier rows' span (they need not be orthonormal any more).
        q, r = torch.linalg.qr(previous.detach().double().T)
        keep = r.diagonal().abs() > 1e-10
        basis = list(q[:, keep].T)
    rows = []
    while len(rows) < count:
        v = torch.randn(dim, generator=generator, dtype=torch.float64)
        for _ in range(2):
            for u in basis:
                v = v - (v @ u) * u
        norm = v.norm()
        if norm < 1e-8:  # numerically in the span already: draw again
            continue
        v = v / norm
        basis.append(v)
        rows.append(v)
    return torch.stack(rows)


def orthogonalise_slice_(slices: Sequence[Tensor], task: int) -> None:
    """Overwrite ``slices[task]`` (groups, n, ...) in place: each group's n rows become random
    unit rows orthogonal to each other and to that group's rows in slices 0..task-1."""
    new = slices[task]
    with torch.no_grad():
        for i in range(new.shape[0]):
            earlier = [slices[s][i].flatten(1) for s in range(task)]
            width = new[i].flatten(1).shape[1]
            previous = torch.cat(earlier) if earlier else new.new_zeros(0, width)
            rows = gram_schmidt_rows(previous, new.shape[1])
            new[i].copy_(rows.view_as(new[i]).to(new))


def ortho_penalty(rows: Tensor) -> Tensor:
    """mean((B B^T - I)^2) of a (N, D) matrix (CODA-Prompt's reference code's penalty)."""
    gram = rows @ rows.T
    return (gram - torch.eye(len(rows), dtype=rows.dtype, device=rows.device)).pow(2).mean()


def pairwise_ortho_penalty(prompts: Sequence[Tensor]) -> Tensor:
    """sum over pairs i < j of mean((A_i A_j^T)^2) for prompts A_i of shape (L_i, d): zero exactly
    when every token of each prompt is orthogonal to every token of every other one (MISA's
    shared/private split; ProMMA's prompt disentanglement)."""
    if len(prompts) < 2:
        raise ConfigError("the orthogonality penalty needs at least two prompts")
    total = prompts[0].new_zeros(())
    for i in range(len(prompts)):
        for j in range(i + 1, len(prompts)):
            total = total + (prompts[i] @ prompts[j].T).pow(2).mean()
    return total
