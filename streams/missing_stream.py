"""The continual stream: one Avalanche experience per missing pattern.

Each task applies one pattern to the dataset: missing modalities are zero-filled and the presence
mask says which are present (see ``cmmm.packing``). With task data ``full`` every task sees the
whole train split under its pattern (method.md's reading); with ``disjoint`` the train split is
cut into one random partition per task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from cmmm.errors import ConfigError
from cmmm.packing import PackedLayout
from streams.base import MultimodalDataset, Split
from streams.patterns import Pattern, pattern_code, pattern_name

TaskData = Literal["full", "disjoint"]

# The data attribute naming each training sample of the Avalanche benchmark (avalanche_benchmark).
SAMPLE_KEY = "sample_key"


def layout_of(dataset: MultimodalDataset) -> PackedLayout:
    return PackedLayout(
        modalities=dataset.modalities,
        seq_lens=tuple(dataset.seq_len(m) for m in dataset.modalities),
        feature_dims=tuple(dataset.feature_dim(m) for m in dataset.modalities),
    )


def pack_split(split: Split, layout: PackedLayout) -> torch.Tensor:
    """All modalities present; patterns are applied per task by ``PatternDataset``."""
    features = {m: torch.from_numpy(split.features[m]) for m in layout.modalities}
    presence = torch.ones(len(split), len(layout.modalities))
    return layout.pack(features, presence)


def pattern_keep_vector(layout: PackedLayout, pattern: Pattern) -> torch.Tensor:
    """A (size,) 0/1 vector: multiplying a fully-present packed sample by it applies the pattern."""
    parts = [
        torch.full((block,), float(present))
        for block, present in zip(layout.block_sizes, pattern, strict=True)
    ]
    parts.append(torch.tensor([float(p) for p in pattern]))
    return torch.cat(parts)


class PatternDataset(Dataset):
    """Samples ``(x, y)`` of a packed split under one missing pattern.

    Avalanche appends the task label when it wraps the dataset; plain loops use ``(x, y)``.

    The pattern is applied at access time from a shared fully-present tensor, so seven tasks cost
    the memory of one.
    """

    def __init__(
        self,
        packed: torch.Tensor,
        labels: torch.Tensor,
        keep: torch.Tensor,
        task_label: int,
        indices: torch.Tensor | None = None,
    ) -> None:
        self.packed = packed
        self.labels = labels
        self.keep = keep
        self.task_label = task_label
        self.indices = torch.arange(len(labels)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = self.indices[i]
        return self.packed[j] * self.keep, self.labels[j]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sample at once, for plain (non-Avalanche) loops and evaluation."""
        return self.packed[self.indices] * self.keep, self.labels[self.indices]


@dataclass
class StreamTask:
    index: int
    pattern: Pattern
    name: str
    code: str
    train: PatternDataset
    valid: PatternDataset
    test: PatternDataset


@dataclass
class MissingModalityStream:
    dataset: MultimodalDataset
    layout: PackedLayout
    tasks: list[StreamTask]
    task_data: TaskData

    @property
    def patterns(self) -> list[Pattern]:
        return [t.pattern for t in self.tasks]

    def full_train(self) -> PatternDataset:
        """The whole train split with every modality present (for pre-training)."""
        return self._full("train")

    def full_valid(self) -> PatternDataset:
        return self._full("valid")

    def _full(self, split: str) -> PatternDataset:
        ref = getattr(self.tasks[0], split)
        keep = torch.ones(self.layout.size)
        return PatternDataset(ref.packed, ref.labels, keep, task_label=0)

    def avalanche_benchmark(self):
        """An Avalanche ``CLScenario`` with ``train_stream``/``test_stream``, one experience each.

        Task labels are the experience indices; the models ignore them (domain-incremental: the
        missing pattern is read from the input), but replay buffers and per-task plugins use them.

        Every training sample also carries its sample key (the data attribute ``SAMPLE_KEY``, not
        part of the mini-batches): its position in the concatenation of all experiences' training
        sets. Avalanche carries data attributes through ``subset`` and ``concat``, so a replay
        buffer built from these datasets knows which samples it holds; a checkpoint stores those
        keys instead of the samples (``cmmm.template_state``).
        """
        from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
        from avalanche.benchmarks.scenarios.task_aware import with_task_labels
        from avalanche.benchmarks.utils import _make_taskaware_classification_dataset
        from avalanche.benchmarks.utils.data_attribute import DataAttribute

        def wrap(ds: PatternDataset, first_key: int | None = None):
            targets = ds.labels[ds.indices]
            wrapped = _make_taskaware_classification_dataset(
                ds, task_labels=ds.task_label, targets=targets.tolist()
            )
            if first_key is None:
                return wrapped
            keys = DataAttribute(list(range(first_key, first_key + len(ds))), name=SAMPLE_KEY)
            # The class's own constructor, as Avalanche's subset/concat do: it keeps the targets
            # and task labels and the dataset type (a plain make_avalanche_dataset would not).
            return type(wrapped)([wrapped], data_attributes=[keys])

        first_keys = np.cumsum([0] + [len(t.train) for t in self.tasks[:-1]]).tolist()
        return with_task_labels(
            benchmark_from_datasets(
                train=[wrap(t.train, k) for t, k in zip(self.tasks, first_keys, strict=True)],
                test=[wrap(t.test) for t in self.tasks],
            )
        )


def build_stream(
    dataset: MultimodalDataset,
    order: list[Pattern],
    task_data: TaskData = "full",
    seed: int = 0,
) -> MissingModalityStream:
    if task_data not in ("full", "disjoint"):
        raise ConfigError(f"task data must be 'full' or 'disjoint', got {task_data!r}")
    for pattern in order:
        if len(pattern) != len(dataset.modalities) or not any(pattern):
            raise ConfigError(f"pattern {pattern} does not fit modalities {dataset.modalities}")
    layout = layout_of(dataset)
    label_dtype = torch.long if dataset.task_type == "classification" else torch.float32
    packed = {
        name: (pack_split(split, layout), torch.as_tensor(split.labels, dtype=label_dtype))
        for name, split in dataset.splits.items()
    }
    n_train = len(dataset.train)
    if task_data == "disjoint":
        if n_train < len(order):
            raise ConfigError(f"{n_train} train samples cannot be cut into {len(order)} tasks")
        permutation = np.random.default_rng(seed).permutation(n_train)
        partitions = [torch.from_numpy(p) for p in np.array_split(permutation, len(order))]
    else:
        partitions = [None] * len(order)
    tasks = []
    for index, pattern in enumerate(order):
        keep = pattern_keep_vector(layout, pattern)
        tasks.append(
            StreamTask(
                index=index,
                pattern=pattern,
                name=pattern_name(pattern, dataset.modalities),
                code=pattern_code(pattern, dataset.modalities),
                train=PatternDataset(*packed["train"], keep, index, partitions[index]),
                valid=PatternDataset(*packed["valid"], keep, index),
                test=PatternDataset(*packed["test"], keep, index),
            )
        )
    return MissingModalityStream(dataset=dataset, layout=layout, tasks=tasks, task_data=task_data)
