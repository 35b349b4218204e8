"""The continual stream: one Avalanche experience per missing pattern.

Each task applies one pattern to the dataset: missing modalities are zero-filled and the presence
mask says which are present (see ``cmmm.data.packing``). With task data ``full`` every task sees the
whole train split under its pattern (method.md's reading); with ``disjoint`` the train split is
cut into one random partition per task.

Missing rates (the seeds' 70 % / 90 % settings, after Lee et al. 2023): with ``missing_rate`` r
below 1, only a random share r of each split's samples follows the task's pattern and the rest
stay complete. ``missing_mode="split"`` is Lee et al.'s "missing both" convention instead: the
share r is divided equally among the pattern's missing modalities, each of those samples losing
that one modality. Which samples lose what is drawn from the seed and the task's pattern (not its
position), so a permuted task order gives every task the same samples.

Held-out patterns (``held_out``): test sets under patterns no task trains on, for evaluating
missing cases never seen in training (``cmmm run --eval-patterns``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from cmmm.config_checks import check_missing_rate
from cmmm.data.dataset import MultimodalDataset, Split
from cmmm.data.packing import PackedLayout
from cmmm.data.patterns import Pattern, pattern_code, pattern_name
from cmmm.errors import ConfigError

TaskData = Literal["full", "disjoint"]
SPLIT_IDS = {"train": 0, "valid": 1, "test": 2}

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


def sample_patterns(
    pattern: Pattern, n: int, rate: float, mode: str, rng: np.random.Generator
) -> tuple[list[Pattern], np.ndarray]:
    """The patterns occurring in ``n`` samples of a task of ``pattern`` at missing rate ``rate``,
    and each sample's index into them (see the module docstring)."""
    check_missing_rate(rate, mode)
    missing = [i for i, present in enumerate(pattern) if not present]
    if not missing:
        return [pattern], np.zeros(n, dtype=np.int64)
    full = tuple(True for _ in pattern)
    if mode == "pattern":
        variants = [full, pattern]
    else:
        variants = [full, *(tuple(i != m for i in range(len(pattern))) for m in missing)]
    which = np.zeros(n, dtype=np.int64)
    # An exact share, as Lee et al.'s splits: round(r * n) samples, not about r * n.
    chosen = rng.permutation(n)[: int(round(rate * n))]
    for k, part in enumerate(np.array_split(chosen, len(variants) - 1), start=1):
        which[part] = k
    return variants, which


class PatternDataset(Dataset):
    """Samples ``(x, y)`` of a packed split under one missing pattern.

    Avalanche appends the task label when it wraps the dataset; plain loops use ``(x, y)``.

    The pattern is applied at access time from a shared fully-present tensor, so seven tasks cost
    the memory of one. ``keep`` is one (size,) vector for every sample, or, with a missing rate,
    a (K, size) table of which ``row_keep[j]`` picks the row of packed sample ``j``.
    """

    def __init__(
        self,
        packed: torch.Tensor,
        labels: torch.Tensor,
        keep: torch.Tensor,
        task_label: int,
        indices: torch.Tensor | None = None,
        row_keep: torch.Tensor | None = None,
    ) -> None:
        if (row_keep is None) != (keep.dim() == 1):
            raise ValueError("a (K, size) keep table needs row_keep, a (size,) vector none")
        self.packed = packed
        self.labels = labels
        self.keep = keep
        self.row_keep = row_keep
        self.task_label = task_label
        self.indices = torch.arange(len(labels)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def _keep(self, rows: torch.Tensor) -> torch.Tensor:
        return self.keep if self.row_keep is None else self.keep[self.row_keep[rows]]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = self.indices[i]
        return self.packed[j] * self._keep(j), self.labels[j]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sample at once, for plain (non-Avalanche) loops and evaluation."""
        return self.packed[self.indices] * self._keep(self.indices), self.labels[self.indices]


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
    # Test-only tasks under patterns no training task has (``--eval-patterns``).
    held_out: list[StreamTask] = field(default_factory=list)
    missing_rate: float = 1.0
    missing_mode: str = "pattern"

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
    *,
    held_out: list[Pattern] | None = None,
    missing_rate: float = 1.0,
    missing_mode: str = "pattern",
) -> MissingModalityStream:
    if task_data not in ("full", "disjoint"):
        raise ConfigError(f"task data must be 'full' or 'disjoint', got {task_data!r}")
    check_missing_rate(missing_rate, missing_mode)
    held_out = list(held_out or [])
    for pattern in [*order, *held_out]:
        if len(pattern) != len(dataset.modalities) or not any(pattern):
            raise ConfigError(f"pattern {pattern} does not fit modalities {dataset.modalities}")
    trained = [p for p in held_out if p in order]
    if trained:
        codes = ", ".join(pattern_code(p, dataset.modalities) for p in trained)
        raise ConfigError(
            f"--eval-patterns: {codes} is also a training task; held-out patterns are the ones "
            "no task trains on (drop it, or take it out of --task-order)"
        )
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

    def under(pattern: Pattern, split: str, task_label: int, indices=None) -> PatternDataset:
        features, labels = packed[split]
        if missing_rate >= 1.0 and missing_mode == "pattern":
            return PatternDataset(
                features, labels, pattern_keep_vector(layout, pattern), task_label, indices
            )
        # Seeded by the pattern, not the task's position (see the module docstring).
        bits = sum(1 << i for i, present in enumerate(pattern) if present)
        rng = np.random.default_rng([seed, bits, SPLIT_IDS[split]])
        variants, which = sample_patterns(pattern, len(labels), missing_rate, missing_mode, rng)
        table = torch.stack([pattern_keep_vector(layout, v) for v in variants])
        return PatternDataset(
            features, labels, table, task_label, indices, row_keep=torch.from_numpy(which)
        )

    def task(index: int, pattern: Pattern, partition: torch.Tensor | None) -> StreamTask:
        name = pattern_name(pattern, dataset.modalities)
        split_matters = missing_mode == "split" and pattern.count(False) > 1
        if not all(pattern) and (missing_rate < 1.0 or split_matters):
            name = f"{name} ({missing_rate:.0%}{', split' if split_matters else ''})"
        return StreamTask(
            index=index,
            pattern=pattern,
            name=name,
            code=pattern_code(pattern, dataset.modalities),
            train=under(pattern, "train", index, partition),
            valid=under(pattern, "valid", index),
            test=under(pattern, "test", index),
        )

    tasks = [task(i, p, partitions[i]) for i, p in enumerate(order)]
    # Held-out tasks continue the numbering; no experience has their labels.
    extra = [task(len(order) + i, p, None) for i, p in enumerate(held_out)]
    return MissingModalityStream(
        dataset=dataset,
        layout=layout,
        tasks=tasks,
        task_data=task_data,
        held_out=extra,
        missing_rate=missing_rate,
        missing_mode=missing_mode,
    )
