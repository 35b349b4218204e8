"""The in-memory form every stream loader produces.

A loader (real CSVs, a published pickle, the synthetic generator) returns a
``MultimodalDataset``: three splits, each a dict of per-modality float32 arrays of shape
``(N, L_m, D_m)`` plus a label vector. Everything downstream (missing-case streams, the
backbone's input widths, the evaluator's metric family) reads only this object.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from cmmm.errors import DataError

TaskType = Literal["regression", "classification"]
# Which accuracy/F1 definition applies (see cmmm.evaluation): MOSI-style regression scores the
# sign on non-zero labels only, SIMS-style on all samples, classification is plain accuracy.
MetricFamily = Literal["mosi", "sims", "classification"]


@dataclass(frozen=True)
class Split:
    """One split: per-modality arrays (N, L_m, D_m) float32 and labels (N,)."""

    features: Mapping[str, np.ndarray]
    labels: np.ndarray
    # Optional group id per sample (the video an utterance comes from), for group-wise splitting.
    groups: np.ndarray | None = None
    # For a modality zero-padded after its real time steps (token sequences of varying length):
    # how many leading steps of each sample are real, (N,) integers. Modalities absent here have
    # no padding (or, like the published pickles, padding nothing knows about).
    lengths: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class MultimodalDataset:
    name: str
    modalities: tuple[str, ...]
    task_type: TaskType
    metric_family: MetricFamily
    train: Split
    valid: Split
    test: Split
    num_classes: int = 1
    class_names: tuple[str, ...] = ()
    # Free text saying where the data came from (real files, a pickle, synthetic + seed).
    source: str = ""
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def splits(self) -> dict[str, Split]:
        return {"train": self.train, "valid": self.valid, "test": self.test}

    def seq_len(self, modality: str) -> int:
        return int(self.train.features[modality].shape[1])

    def feature_dim(self, modality: str) -> int:
        return int(self.train.features[modality].shape[2])

    def validate(self) -> MultimodalDataset:
        """Check shapes, dtypes and finiteness; raise ``DataError`` naming the problem."""
        if self.task_type == "classification" and self.num_classes < 2:
            raise DataError(f"{self.name}: a classification dataset needs num_classes >= 2")
        for split_name, split in self.splits.items():
            where = f"{self.name}/{split_name}"
            if split.labels.ndim != 1:
                raise DataError(f"{where}: labels must be 1-D, got shape {split.labels.shape}")
            n = split.labels.shape[0]
            if n == 0:
                raise DataError(f"{where}: the split is empty")
            if set(split.features) != set(self.modalities):
                raise DataError(
                    f"{where}: modalities {sorted(split.features)} != expected "
                    f"{sorted(self.modalities)}"
                )
            for m in self.modalities:
                arr = split.features[m]
                if arr.ndim != 3 or arr.shape[0] != n:
                    raise DataError(f"{where}: {m} must have shape (N={n}, L, D), got {arr.shape}")
                if arr.dtype != np.float32:
                    raise DataError(f"{where}: {m} must be float32, got {arr.dtype}")
                ref = self.train.features[m].shape[1:]
                if arr.shape[1:] != ref:
                    raise DataError(f"{where}: {m} has (L, D) {arr.shape[1:]}, train has {ref}")
                if not np.isfinite(arr).all():
                    raise DataError(f"{where}: {m} holds NaN or infinite values")
            for m, lengths in split.lengths.items():
                if m not in self.modalities:
                    raise DataError(f"{where}: lengths given for unknown modality {m!r}")
                steps = split.features[m].shape[1]
                if (
                    lengths.dtype.kind not in "iu"
                    or lengths.shape != (n,)
                    or lengths.min() < 1
                    or lengths.max() > steps
                ):
                    raise DataError(
                        f"{where}: lengths of {m} must be (N={n},) integers in [1, {steps}]"
                    )
                padding = np.arange(steps)[None, :] >= lengths[:, None]
                if np.any(split.features[m][padding]):
                    raise DataError(f"{where}: {m} is not zero after each sample's length")
            if not np.isfinite(split.labels.astype(np.float64)).all():
                raise DataError(f"{where}: labels hold NaN or infinite values")
            if self.task_type == "classification":
                lab = split.labels
                if lab.dtype.kind not in "iu" or lab.min() < 0 or lab.max() >= self.num_classes:
                    raise DataError(
                        f"{where}: class labels must be integers in [0, {self.num_classes})"
                    )
        return self
