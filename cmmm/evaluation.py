"""The evaluator: per-task metrics, the accuracy matrix, and AA / FM / BWT.

Every strategy is scored by this module alone, with a plain ``DataLoader`` loop rather than
Avalanche's metrics (whose "forgetting" is a different quantity and whose accuracy is meaningless
on a one-column regression output), so two strategies' numbers are always comparable.

Units: ``acc`` and ``f1`` are in percent (0-100), as in the paper's tables, and the accuracy
matrix stores ``acc`` in percent, so AA, FM and BWT are in percentage points. ``mae`` and
``pearson`` are in the label's own units.

Matrix convention: ``a[j, i]`` is the accuracy on task ``i`` after training step ``j`` (rows are
training steps, columns tasks, both 0-based here; method.md writes them 1-based). Cells that were
not evaluated are NaN. Joint training has a single row.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.functional import mean_absolute_error, pearson_corrcoef
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

from cmmm.data.dataset import MetricFamily
from cmmm.errors import CmmmError

METRIC_FAMILIES: tuple[str, ...] = ("mosi", "sims", "classification")


# --------------------------------------------------------------------------------------------
# The accuracy matrix and the continual-learning summaries computed from it
# --------------------------------------------------------------------------------------------


class AccuracyMatrix:
    """``a[j, i]``: accuracy (percent) on task ``i`` after training step ``j``; NaN = not evaluated.

    Shape is (num_steps, num_tasks): num_steps == num_tasks for sequential training, 1 for joint
    training.
    """

    def __init__(self, num_tasks: int, num_steps: int | None = None) -> None:
        num_steps = num_tasks if num_steps is None else num_steps
        if num_tasks < 1 or num_steps < 1:
            raise CmmmError(
                f"an accuracy matrix needs at least one task and one step, "
                f"got num_tasks={num_tasks}, num_steps={num_steps}"
            )
        self.values = np.full((num_steps, num_tasks), np.nan, dtype=np.float64)

    @classmethod
    def from_values(cls, values: MatrixLike) -> AccuracyMatrix:
        array = as_matrix_array(values)
        matrix = cls(num_tasks=array.shape[1], num_steps=array.shape[0])
        matrix.values[:] = array
        return matrix

    @property
    def num_steps(self) -> int:
        return int(self.values.shape[0])

    @property
    def num_tasks(self) -> int:
        return int(self.values.shape[1])

    def set_row(self, step: int, accuracies: Sequence[float]) -> None:
        if not 0 <= step < self.num_steps:
            raise CmmmError(f"step {step} is outside the matrix's 0..{self.num_steps - 1} rows")
        if len(accuracies) != self.num_tasks:
            raise CmmmError(
                f"step {step}: got {len(accuracies)} accuracies for {self.num_tasks} tasks"
            )
        self.values[step] = np.asarray(accuracies, dtype=np.float64)

    def recorded_steps(self) -> list[int]:
        """Rows holding at least one evaluated cell."""
        return [int(j) for j in np.flatnonzero(~np.isnan(self.values).all(axis=1))]

    def to_list(self) -> list[list[float | None]]:
        """Nested lists with ``None`` for NaN, so the result is strict JSON."""
        return [[_none_if_nan(v) for v in row] for row in self.values.tolist()]

    def average_accuracy(self) -> float:
        return average_accuracy(self)

    def forgetting_measure(self) -> float | None:
        return forgetting_measure(self)

    def backward_transfer(self) -> float | None:
        return backward_transfer(self)

    def average_accuracy_so_far(self) -> list[float]:
        return average_accuracy_so_far(self)

    def __repr__(self) -> str:
        return f"AccuracyMatrix(steps={self.num_steps}, tasks={self.num_tasks})"


MatrixLike = AccuracyMatrix | np.ndarray | Sequence[Sequence[float | None]]


def as_matrix_array(matrix: MatrixLike) -> np.ndarray:
    """A float64 (steps, tasks) copy; ``None`` becomes NaN. Infinite values are rejected."""
    if isinstance(matrix, AccuracyMatrix):
        return matrix.values.copy()
    if isinstance(matrix, np.ndarray):
        array = matrix.astype(np.float64)
    else:
        if any(not isinstance(row, Sequence) for row in matrix):
            raise CmmmError("an accuracy matrix must be 2-D (a list of rows), got a flat list")
        rows = [[np.nan if v is None else v for v in row] for row in matrix]
        widths = {len(row) for row in rows}
        if len(widths) > 1:
            raise CmmmError(f"accuracy matrix rows have different lengths: {sorted(widths)}")
        array = np.asarray(rows, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise CmmmError(
            f"an accuracy matrix must be 2-D (steps x tasks) and non-empty, got shape {array.shape}"
        )
    if np.isinf(array).any():
        raise CmmmError("the accuracy matrix holds infinite values")
    return array


def _require_evaluated(array: np.ndarray, cells: Sequence[tuple[int, int]], what: str) -> None:
    missing = [(j, i) for j, i in cells if np.isnan(array[j, i])]
    if missing:
        shown = ", ".join(f"a[{j},{i}]" for j, i in missing[:5])
        raise CmmmError(
            f"{what} needs cells that were not evaluated (NaN): {shown} "
            f"(0-based: a[step, task]); evaluate every task after every step"
        )


def average_accuracy(matrix: MatrixLike) -> float:
    """AA = mean over tasks of the last row: accuracy on every task after the final step."""
    array = as_matrix_array(matrix)
    last = array.shape[0] - 1
    _require_evaluated(array, [(last, i) for i in range(array.shape[1])], "average accuracy")
    return float(array[last].mean())


def _square_or_none(matrix: MatrixLike, what: str) -> np.ndarray | None:
    array = as_matrix_array(matrix)
    steps, tasks = array.shape
    if steps == 1:
        return None  # joint training, or a single task: nothing can be forgotten
    if steps != tasks:
        raise CmmmError(
            f"{what} needs a square matrix (one training step per task), got {steps} steps x "
            f"{tasks} tasks"
        )
    return array


def forgetting_measure(matrix: MatrixLike) -> float | None:
    """FM (Chaudhry et al. 2018), in method.md's form; ``None`` for a single row.

    FM = 1/(T-1) * sum over tasks i < T-1 (0-based) of
         max over steps l in [i, T-2] of a[l, i]  minus  a[T-1, i].
    The max runs from the step that learned task i to the second-to-last step, so it is not
    necessarily the diagonal. Not clamped at 0: negative FM means later training improved earlier
    tasks.
    """
    array = _square_or_none(matrix, "the forgetting measure")
    if array is None:
        return None
    last = array.shape[0] - 1
    cells = [(j, i) for i in range(last) for j in range(i, last + 1)]
    _require_evaluated(array, cells, "the forgetting measure")
    drops = [array[i:last, i].max() - array[last, i] for i in range(last)]
    return float(np.mean(drops))


def backward_transfer(matrix: MatrixLike) -> float | None:
    """BWT = 1/(T-1) * sum over tasks i < T-1 of a[T-1, i] - a[i, i]; ``None`` for a single row.

    Positive BWT: later training helped earlier tasks. Avalanche's "forgetting" equals -BWT.
    """
    array = _square_or_none(matrix, "backward transfer")
    if array is None:
        return None
    last = array.shape[0] - 1
    cells = [(j, i) for i in range(last) for j in (i, last)]
    _require_evaluated(array, cells, "backward transfer")
    return float(np.mean([array[last, i] - array[i, i] for i in range(last)]))


def average_accuracy_so_far(matrix: MatrixLike) -> list[float]:
    """For each step j, the mean of a[j, i] over the tasks seen so far (i <= j); for plots."""
    array = as_matrix_array(matrix)
    steps, tasks = array.shape
    if steps > tasks:
        raise CmmmError(f"more steps ({steps}) than tasks ({tasks}): cannot tell the seen tasks")
    cells = [(j, i) for j in range(steps) for i in range(j + 1)]
    _require_evaluated(array, cells, "the average accuracy so far")
    return [float(array[j, : j + 1].mean()) for j in range(steps)]


# --------------------------------------------------------------------------------------------
# Per-task metrics
# --------------------------------------------------------------------------------------------

# torchmetrics warns (and returns NaN) when either side of a Pearson correlation is constant;
# NaN is the answer we want, the warning is noise in every early-training evaluation.
_CONSTANT_PEARSON_WARNING = r"The variance of predictions or target is close to zero"


def _pearson(preds: Tensor, targets: Tensor) -> float:
    if preds.numel() < 2:
        return math.nan
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CONSTANT_PEARSON_WARNING)
        return float(pearson_corrcoef(preds.double(), targets.double()))


def _sign_scores(preds: Tensor, targets: Tensor) -> dict[str, float]:
    """Binary accuracy and weighted F1 (percent) of ``pred > 0`` vs ``label > 0``."""
    if preds.numel() == 0:
        return {"acc": math.nan, "f1": math.nan}
    # Thresholding here, not in torchmetrics: given floats, it would squash with a sigmoid only
    # when some value lies outside [0, 1] and then threshold at 0.5, so 0.3 would count as
    # negative.
    predicted_positive = (preds > 0).long()
    target_positive = (targets > 0).long()
    acc = multiclass_accuracy(predicted_positive, target_positive, num_classes=2, average="micro")
    f1 = multiclass_f1_score(predicted_positive, target_positive, num_classes=2, average="weighted")
    return {"acc": 100.0 * float(acc), "f1": 100.0 * float(f1)}


def task_metrics(
    preds: Tensor, targets: Tensor, family: MetricFamily, num_classes: int = 1
) -> dict[str, float]:
    """Metrics for one task's test set. ``acc`` and ``f1`` in percent.

    - "mosi" (CMU-MOSI/MOSEI convention, as MulT and MMSA report ``Acc-2``/``F1`` "non-0"):
      ``acc`` = binary accuracy of pred > 0 vs label > 0 over samples whose label is non-zero;
      ``f1`` = weighted F1 of the two sign classes over the same samples (sklearn's
      ``average="weighted"``, as MulT/MMSA use); ``mae`` and ``pearson`` over all samples;
      ``n`` = all samples, ``n_nonzero`` = samples entering acc/f1.
    - "sims" (CH-SIMS): the same scores with acc/f1 over all samples (label 0 counts as
      negative).
    - "classification": preds are logits (B, C); ``acc`` = micro multiclass accuracy, ``f1`` =
      weighted F1 over the classes, ``f1_macro`` = their unweighted mean (mfeat's metric; on a
      test set with as many samples of every class, as mfeat's, the two are equal).

    Pearson is NaN (never an exception) when preds or labels are constant or there is one sample.
    """
    if family not in METRIC_FAMILIES:
        raise CmmmError(f"unknown metric family {family!r}; expected one of {METRIC_FAMILIES}")
    preds = preds.detach().cpu()
    targets = targets.detach().cpu()
    n = int(targets.shape[0]) if targets.ndim > 0 else 0
    if targets.ndim != 1 or n == 0:
        raise CmmmError(f"targets must be a non-empty 1-D tensor, got shape {tuple(targets.shape)}")

    if family == "classification":
        if num_classes < 2:
            raise CmmmError(f"classification metrics need num_classes >= 2, got {num_classes}")
        if preds.shape != (n, num_classes):
            raise CmmmError(
                f"classification predictions must be logits of shape ({n}, {num_classes}), "
                f"got {tuple(preds.shape)}"
            )
        labels = targets.long()
        if labels.min() < 0 or labels.max() >= num_classes:
            raise CmmmError(f"class labels must lie in [0, {num_classes})")
        logits = preds.float()
        acc = multiclass_accuracy(logits, labels, num_classes=num_classes, average="micro")
        f1 = multiclass_f1_score(logits, labels, num_classes=num_classes, average="weighted")
        macro = multiclass_f1_score(logits, labels, num_classes=num_classes, average="macro")
        return {
            "acc": 100.0 * float(acc),
            "f1": 100.0 * float(f1),
            "f1_macro": 100.0 * float(macro),
            "n": n,
        }

    if preds.ndim == 2 and preds.shape[1] == 1:
        preds = preds[:, 0]
    if preds.shape != (n,):
        raise CmmmError(
            f"regression predictions must have shape ({n},) or ({n}, 1), got {tuple(preds.shape)}"
        )
    preds = preds.double()
    values = targets.double()
    regression = {
        "mae": float(mean_absolute_error(preds, values)),
        "pearson": _pearson(preds, values),
        "n": n,
    }
    if family == "sims":
        return {**_sign_scores(preds, values), **regression}
    nonzero = values != 0
    return {
        **_sign_scores(preds[nonzero], values[nonzero]),
        **regression,
        "n_nonzero": int(nonzero.sum()),
    }


# --------------------------------------------------------------------------------------------
# The evaluator
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalTask:
    """One task's test set; the dataset yields ``(x, y, task_label, ...)`` samples."""

    name: str
    dataset: Dataset


def _none_if_nan(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _json_metrics(metrics: Mapping[str, float]) -> dict[str, float | None]:
    return {key: _none_if_nan(value) for key, value in metrics.items()}


class Evaluator:
    """Scores a model on every task's test set and keeps the accuracy matrix and history.

    Usage: after training step ``j``, ``evaluator.record(j, evaluator.evaluate(model))`` (or
    ``evaluate_and_record``); at the end, ``summary()``. The model must already be on ``device``;
    only the inputs are moved there. It is called as ``model(x)`` and must return (B,) or (B, 1)
    for regression, (B, num_classes) logits for classification.
    """

    def __init__(
        self,
        tasks: Sequence[EvalTask],
        family: MetricFamily,
        num_classes: int = 1,
        batch_size: int = 256,
        device: str | torch.device = "cpu",
        num_steps: int | None = None,
    ) -> None:
        if not tasks:
            raise CmmmError("the evaluator needs at least one task")
        names = [task.name for task in tasks]
        if len(set(names)) != len(names):
            raise CmmmError(f"task names must be unique, got {names}")
        if family not in METRIC_FAMILIES:
            raise CmmmError(f"unknown metric family {family!r}; expected one of {METRIC_FAMILIES}")
        if family == "classification" and num_classes < 2:
            raise CmmmError(f"classification needs num_classes >= 2, got {num_classes}")
        if batch_size < 1:
            raise CmmmError(f"batch_size must be positive, got {batch_size}")
        self.tasks = list(tasks)
        self.family: MetricFamily = family
        self.num_classes = num_classes
        self.batch_size = batch_size
        self._tensors: dict[str, tuple[Tensor, Tensor]] = {}
        self.device = torch.device(device)
        self.matrix = AccuracyMatrix(num_tasks=len(self.tasks), num_steps=num_steps)
        # step -> per-task metrics, in task order
        self.history: dict[int, list[dict[str, float]]] = {}

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    def _task_tensors(self, task: EvalTask) -> tuple[Tensor, Tensor]:
        """The task's whole test set as (x, y), read once and kept: a test set never changes,
        and reading it sample by sample through a DataLoader costs more than the forward pass.
        On a GPU the inputs are pinned so that the copy can overlap."""
        if task.name not in self._tensors:
            tensors = getattr(task.dataset, "tensors", None)
            if callable(tensors):
                x, y = tensors()
            else:
                loader = DataLoader(task.dataset, batch_size=self.batch_size, shuffle=False)
                batches = [(batch[0], torch.as_tensor(batch[1])) for batch in loader]
                if not batches:
                    raise CmmmError(f"task {task.name!r}: the test set is empty")
                x = torch.cat([b[0] for b in batches])
                y = torch.cat([b[1] for b in batches])
            if len(x) == 0:
                raise CmmmError(f"task {task.name!r}: the test set is empty")
            if self.device.type == "cuda":
                x = x.pin_memory()
            self._tensors[task.name] = (x, torch.as_tensor(y).cpu())
        return self._tensors[task.name]

    def _predict(self, model: nn.Module, task: EvalTask) -> tuple[Tensor, Tensor]:
        x, targets = self._task_tensors(task)
        all_preds: list[Tensor] = []
        # One task per forward pass (a batch never mixes missing patterns, as in training), in
        # chunks of ``batch_size`` samples.
        for chunk in x.split(self.batch_size):
            output = model(chunk.to(self.device, non_blocking=True))
            if not isinstance(output, Tensor):
                raise CmmmError(
                    f"task {task.name!r}: the model returned {type(output).__name__}, "
                    "expected a tensor of shape (B,) or (B, C)"
                )
            all_preds.append(output.detach().float())
        return torch.cat(all_preds).cpu(), targets

    def evaluate(self, model: nn.Module) -> list[dict[str, float]]:
        """Per-task metrics of ``model`` in eval mode; each module's train/eval mode is restored."""
        # Per module, not model.train(was_training): a strategy may keep a frozen part in eval
        # mode while the rest trains, and that must survive an evaluation.
        previous_modes = [(module, module.training) for module in model.modules()]
        model.eval()
        try:
            with torch.inference_mode():
                results = []
                for task in self.tasks:
                    preds, targets = self._predict(model, task)
                    results.append(task_metrics(preds, targets, self.family, self.num_classes))
        finally:
            for module, was_training in previous_modes:
                module.training = was_training
        return results

    def record(self, step: int, per_task: Sequence[Mapping[str, float]]) -> None:
        """Store the metrics after training step ``step``: ``acc`` fills row ``step``."""
        if step in self.history:
            raise CmmmError(f"step {step} was already recorded")
        if len(per_task) != len(self.tasks):
            raise CmmmError(
                f"step {step}: got metrics for {len(per_task)} tasks, expected {len(self.tasks)}"
            )
        missing = [i for i, metrics in enumerate(per_task) if "acc" not in metrics]
        if missing:
            raise CmmmError(f"step {step}: metrics of tasks {missing} have no 'acc'")
        accuracies = [float(metrics["acc"]) for metrics in per_task]
        # A NaN accuracy (a MOSI test set whose labels are all zero) would make AA and FM
        # undefined; say so now rather than at the end of a long run.
        undefined = [self.tasks[i].name for i, acc in enumerate(accuracies) if math.isnan(acc)]
        if undefined:
            raise CmmmError(
                f"step {step}: accuracy is undefined (NaN) for tasks {undefined}; "
                "a MOSI-style test set needs samples with non-zero labels"
            )
        self.matrix.set_row(step, accuracies)
        self.history[step] = [dict(metrics) for metrics in per_task]

    def state_dict(self) -> dict[str, Any]:
        """What was recorded so far (plain values), for a run's checkpoint."""
        return {"history": {step: [dict(m) for m in self.history[step]] for step in self.history}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Record a ``state_dict`` again, step by step, into an evaluator that recorded nothing."""
        if self.history:
            raise CmmmError("load_state_dict needs an evaluator that has recorded nothing")
        for step, per_task in sorted(state["history"].items()):
            self.record(step, per_task)

    def evaluate_and_record(self, step: int, model: nn.Module) -> list[dict[str, float]]:
        per_task = self.evaluate(model)
        self.record(step, per_task)
        return per_task

    def summary(self) -> dict[str, Any]:
        """Matrix (None for NaN), AA, FM, BWT, final per-task metrics and the whole history.

        AA and ``per_task_final`` come from the last recorded step. FM and BWT are ``None`` until
        every step has been recorded (and always for a single step). The result is strict JSON.
        """
        recorded = sorted(self.history)
        # Steps and tasks differ for held-out tasks (tested, never trained): no FM or BWT then.
        complete = len(recorded) == self.matrix.num_steps and self.matrix.num_steps in (
            1,
            self.matrix.num_tasks,
        )
        last = recorded[-1] if recorded else None
        average = None
        per_task_final: list[dict[str, Any]] = []
        if last is not None:
            average = average_accuracy(self.matrix.values[last : last + 1])
            per_task_final = [
                {"task": name, **_json_metrics(metrics)}
                for name, metrics in zip(self.task_names, self.history[last], strict=True)
            ]
        # The curve needs one step per task and stops at the first step not yet recorded.
        aa_so_far = None
        if self.matrix.num_steps == self.matrix.num_tasks and recorded:
            prefix = 0
            while prefix in self.history:
                prefix += 1
            if prefix:
                aa_so_far = average_accuracy_so_far(self.matrix.values[:prefix])
        return {
            "metric_family": self.family,
            "tasks": self.task_names,
            "matrix": self.matrix.to_list(),
            "aa": average,
            "fm": forgetting_measure(self.matrix) if complete else None,
            "bwt": backward_transfer(self.matrix) if complete else None,
            "aa_so_far": aa_so_far,
            "per_task_final": per_task_final,
            "history": [
                {
                    "step": step,
                    "per_task": [
                        {"task": name, **_json_metrics(metrics)}
                        for name, metrics in zip(self.task_names, self.history[step], strict=True)
                    ],
                }
                for step in recorded
            ],
        }
