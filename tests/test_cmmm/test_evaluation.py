"""The evaluator's arithmetic (AA, FM, BWT), per-task metrics and evaluation loop.

Every expected number is worked out by hand in the comment next to it.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from cmmm.errors import CmmmError
from cmmm.evaluation import (
    AccuracyMatrix,
    EvalTask,
    Evaluator,
    average_accuracy,
    average_accuracy_so_far,
    backward_transfer,
    forgetting_measure,
    task_metrics,
)

NAN = float("nan")

# Rows = after training step j, columns = task i. Upper triangle not evaluated.
FORGETTING_3X3 = [
    [80.0, NAN, NAN],
    [70.0, 90.0, NAN],
    [60.0, 85.0, 75.0],
]

# The max over rows for task 0 is at row 1 and for task 1 at row 2 (not the diagonal); task 2
# improves after it was learned (55 -> 65).
MIXED_4X4 = [
    [50.0, 10.0, 10.0, 10.0],
    [70.0, 60.0, 12.0, 11.0],
    [65.0, 80.0, 55.0, 20.0],
    [60.0, 70.0, 65.0, 58.0],
]

# Every later step improves the earlier tasks.
IMPROVING_3X3 = [
    [50.0, None, None],
    [60.0, 70.0, None],
    [70.0, 80.0, 90.0],
]


# ---------------------------------------------------------------- AA / FM / BWT


def test_metrics_of_a_3x3_matrix_with_forgetting() -> None:
    # AA = (60 + 85 + 75) / 3
    assert average_accuracy(FORGETTING_3X3) == pytest.approx(220 / 3)
    # task 0: max(80, 70) - 60 = 20; task 1: 90 - 85 = 5; FM = 25 / 2
    assert forgetting_measure(FORGETTING_3X3) == pytest.approx(12.5)
    # BWT = ((60 - 80) + (85 - 90)) / 2
    assert backward_transfer(FORGETTING_3X3) == pytest.approx(-12.5)


def test_fm_takes_the_max_over_intermediate_rows_and_is_not_clamped() -> None:
    # task 0: max(50, 70, 65) - 60 = 10 (row 1); task 1: max(60, 80) - 70 = 10 (row 2);
    # task 2: 55 - 65 = -10 (improved). FM = (10 + 10 - 10) / 3
    assert forgetting_measure(MIXED_4X4) == pytest.approx(10 / 3)
    # BWT = ((60 - 50) + (70 - 60) + (65 - 55)) / 3 = 10: the diagonal alone would say "no
    # forgetting at all", FM's max does not.
    assert backward_transfer(MIXED_4X4) == pytest.approx(10.0)
    # AA = (60 + 70 + 65 + 58) / 4
    assert average_accuracy(MIXED_4X4) == pytest.approx(63.25)


def test_fm_is_negative_when_later_tasks_improve_earlier_ones() -> None:
    # task 0: max(50, 60) - 70 = -10; task 1: 70 - 80 = -10
    assert forgetting_measure(IMPROVING_3X3) == pytest.approx(-10.0)
    # BWT = ((70 - 50) + (80 - 70)) / 2 = 15, so FM != -BWT here
    assert backward_transfer(IMPROVING_3X3) == pytest.approx(15.0)
    assert average_accuracy(IMPROVING_3X3) == pytest.approx(80.0)


def test_average_accuracy_so_far() -> None:
    # 50; (70 + 60) / 2; (65 + 80 + 55) / 3; (60 + 70 + 65 + 58) / 4
    assert average_accuracy_so_far(MIXED_4X4) == pytest.approx([50.0, 65.0, 200 / 3, 63.25])
    assert average_accuracy_so_far(FORGETTING_3X3) == pytest.approx([80.0, 80.0, 220 / 3])


def test_numpy_input_and_the_matrix_object_agree_with_lists() -> None:
    matrix = AccuracyMatrix.from_values(np.array(MIXED_4X4))
    assert matrix.average_accuracy() == pytest.approx(63.25)
    assert matrix.forgetting_measure() == pytest.approx(10 / 3)
    assert matrix.backward_transfer() == pytest.approx(10.0)
    assert forgetting_measure(np.array(MIXED_4X4)) == pytest.approx(10 / 3)


def test_a_single_row_has_aa_but_no_fm_or_bwt() -> None:
    joint = [[70.0, 80.0, 90.0]]
    assert average_accuracy(joint) == pytest.approx(80.0)
    assert forgetting_measure(joint) is None
    assert backward_transfer(joint) is None
    assert forgetting_measure([[42.0]]) is None


def test_fm_and_bwt_reject_a_non_square_matrix() -> None:
    two_by_three = [[70.0, 80.0, 90.0], [60.0, 85.0, 95.0]]
    with pytest.raises(CmmmError, match="square"):
        forgetting_measure(two_by_three)
    with pytest.raises(CmmmError, match="square"):
        backward_transfer(two_by_three)


def test_a_needed_cell_that_was_not_evaluated_is_named() -> None:
    holes = [row[:] for row in MIXED_4X4]
    holes[1][0] = NAN  # a[1, 0] enters FM's max for task 0
    with pytest.raises(CmmmError, match=r"a\[1,0\]"):
        forgetting_measure(holes)
    with pytest.raises(CmmmError, match="not evaluated"):
        average_accuracy([[1.0, 2.0], [3.0, NAN]])


def test_malformed_matrices_are_rejected() -> None:
    with pytest.raises(CmmmError, match="2-D"):
        average_accuracy([1.0, 2.0])  # type: ignore[list-item]
    with pytest.raises(CmmmError, match="different lengths"):
        average_accuracy([[1.0, 2.0], [3.0]])
    with pytest.raises(CmmmError, match="infinite"):
        average_accuracy([[math.inf]])


def test_matrix_to_list_uses_none_for_nan() -> None:
    matrix = AccuracyMatrix(num_tasks=2)
    matrix.set_row(0, [50.0, 25.0])
    assert matrix.to_list() == [[50.0, 25.0], [None, None]]
    assert matrix.recorded_steps() == [0]
    with pytest.raises(CmmmError, match="outside"):
        matrix.set_row(2, [1.0, 2.0])
    with pytest.raises(CmmmError, match="3 accuracies for 2 tasks"):
        matrix.set_row(1, [1.0, 2.0, 3.0])


# ---------------------------------------------------------------- per-task metrics

# Non-zero labels (indices 0-4): truth positive = [1, 1, 1, 0, 0], every prediction positive.
# The two zero labels (indices 5, 6) get negative predictions.
REGRESSION_LABELS = torch.tensor([1.0, 2.0, 0.5, -1.0, -0.5, 0.0, 0.0])
REGRESSION_PREDS = torch.tensor([0.5, 0.8, 0.1, 0.2, 0.3, -0.4, -0.9])


def test_mosi_scores_the_sign_on_non_zero_labels_only() -> None:
    metrics = task_metrics(REGRESSION_PREDS, REGRESSION_LABELS, "mosi")
    # 3 of the 5 non-zero samples right; counting the zeros would give 5 / 7.
    assert metrics["acc"] == pytest.approx(60.0)
    # positive: TP 3, FP 2, FN 0 -> F1 6/8 = 0.75 (support 3); negative: TP 0 -> F1 0 (support 2)
    # weighted = (3 * 0.75 + 2 * 0) / 5 = 0.45
    assert metrics["f1"] == pytest.approx(45.0)
    # MAE over all 7: .5 + 1.2 + .4 + 1.2 + .8 + .4 + .9 = 5.4
    assert metrics["mae"] == pytest.approx(5.4 / 7)
    expected_r = np.corrcoef(REGRESSION_PREDS.numpy(), REGRESSION_LABELS.numpy())[0, 1]
    assert metrics["pearson"] == pytest.approx(expected_r)
    assert metrics["n"] == 7
    assert metrics["n_nonzero"] == 5


def test_sims_scores_the_sign_on_all_samples() -> None:
    metrics = task_metrics(REGRESSION_PREDS, REGRESSION_LABELS, "sims")
    # The zero labels are negatives predicted negative: 5 of 7 right.
    assert metrics["acc"] == pytest.approx(500 / 7)
    # positive: TP 3, FP 2, FN 0 -> 0.75 (support 3); negative: TP 2, FP 0, FN 2 -> P 1, R 0.5,
    # F1 2/3 (support 4). weighted = (3 * 0.75 + 4 * 2/3) / 7
    assert metrics["f1"] == pytest.approx(100 * (2.25 + 8 / 3) / 7)
    assert metrics["mae"] == pytest.approx(5.4 / 7)
    assert metrics["n"] == 7
    assert "n_nonzero" not in metrics


def test_small_positive_predictions_count_as_positive() -> None:
    # 0.3 is a regression output, not a probability: it is positive.
    metrics = task_metrics(torch.tensor([0.3, -0.3]), torch.tensor([1.0, -1.0]), "sims")
    assert metrics["acc"] == pytest.approx(100.0)


def test_regression_accepts_a_one_column_output() -> None:
    metrics = task_metrics(REGRESSION_PREDS[:, None], REGRESSION_LABELS, "mosi")
    assert metrics["acc"] == pytest.approx(60.0)


def test_pearson_is_nan_not_an_error_for_constant_predictions() -> None:
    labels = torch.tensor([1.0, -1.0, 2.0])
    metrics = task_metrics(torch.full((3,), 0.5), labels, "mosi")
    assert math.isnan(metrics["pearson"])
    assert metrics["acc"] == pytest.approx(200 / 3)  # always positive: 2 of 3
    assert task_metrics(2 * labels + 1, labels, "sims")["pearson"] == pytest.approx(1.0)
    assert task_metrics(-labels, labels, "sims")["pearson"] == pytest.approx(-1.0)
    assert math.isnan(task_metrics(torch.tensor([0.5]), torch.tensor([1.0]), "sims")["pearson"])


def test_mosi_with_only_zero_labels_has_nan_accuracy() -> None:
    metrics = task_metrics(torch.tensor([0.5, -0.5]), torch.tensor([0.0, 0.0]), "mosi")
    assert math.isnan(metrics["acc"])
    assert metrics["n_nonzero"] == 0
    assert metrics["mae"] == pytest.approx(0.5)


def test_classification_accuracy_and_weighted_f1() -> None:
    targets = torch.tensor([0, 0, 0, 1, 2, 2])
    predicted = torch.tensor([0, 0, 0, 1, 1, 1])
    logits = nn.functional.one_hot(predicted, num_classes=3).float() * 3.0 - 1.0
    metrics = task_metrics(logits, targets, "classification", num_classes=3)
    # 4 of 6 right (micro accuracy)
    assert metrics["acc"] == pytest.approx(400 / 6)
    # class 0: F1 1 (support 3); class 1: TP 1, FP 2 -> F1 2/4 = 0.5 (support 1); class 2: F1 0
    # (support 2). weighted = (3 * 1 + 1 * 0.5 + 0) / 6; macro would be 0.5, micro 2/3.
    assert metrics["f1"] == pytest.approx(100 * 3.5 / 6)
    assert metrics["f1_macro"] == pytest.approx(100 * 1.5 / 3)
    assert metrics["n"] == 6


def test_bad_metric_inputs_are_rejected() -> None:
    with pytest.raises(CmmmError, match="logits of shape"):
        task_metrics(torch.zeros(4), torch.zeros(4, dtype=torch.long), "classification", 3)
    with pytest.raises(CmmmError, match="num_classes >= 2"):
        task_metrics(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), "classification", 1)
    with pytest.raises(CmmmError, match=r"\[0, 3\)"):
        task_metrics(torch.zeros(2, 3), torch.tensor([0, 3]), "classification", 3)
    with pytest.raises(CmmmError, match="shape"):
        task_metrics(torch.zeros(4, 2), torch.zeros(4), "mosi")
    with pytest.raises(CmmmError, match="unknown metric family"):
        task_metrics(torch.zeros(4), torch.zeros(4), "mosei")  # type: ignore[arg-type]
    with pytest.raises(CmmmError, match="non-empty"):
        task_metrics(torch.zeros(0), torch.zeros(0), "sims")


# ---------------------------------------------------------------- the evaluator


class FirstFeatureRegressor(nn.Module):
    """Predicts ``sign * x[:, 0]`` through a linear layer; records the mode it was called in."""

    def __init__(self, sign: float = 1.0) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 1)
        self.frozen_part = nn.Dropout(0.5)
        self.set_sign(sign)
        self.seen_training: list[bool] = []
        self.seen_inference_mode: list[bool] = []

    def set_sign(self, sign: float) -> None:
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[sign, 0.0]]))
            self.linear.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.training)
        self.seen_inference_mode.append(torch.is_inference_mode_enabled())
        return self.linear(x)[:, 0]


def _task(name: str, first_feature: list[float], labels: list[float]) -> EvalTask:
    x = torch.tensor([[value, 0.0] for value in first_feature])
    y = torch.tensor(labels)
    return EvalTask(name, TensorDataset(x, y, torch.zeros(len(labels), dtype=torch.long)))


def _two_mosi_tasks() -> list[EvalTask]:
    return [
        # non-zero labels at 0, 1, 2: predictions +, +, - vs labels +, -, - -> 2 of 3 right
        _task("full", [1.0, 2.0, -1.0, -3.0], [1.0, -1.0, -2.0, 0.0]),
        # both right
        _task("missing_a", [0.5, -0.5], [1.0, -1.0]),
    ]


def test_evaluator_scores_each_task_and_restores_the_modes() -> None:
    # batch_size 3 splits the first task across two batches.
    evaluator = Evaluator(_two_mosi_tasks(), family="mosi", batch_size=3)
    model = FirstFeatureRegressor()
    model.train()
    model.frozen_part.eval()  # a part a strategy keeps in eval mode must stay so

    per_task = evaluator.evaluate(model)

    assert [metrics["acc"] for metrics in per_task] == pytest.approx([200 / 3, 100.0])
    assert [metrics["n"] for metrics in per_task] == [4, 2]
    assert model.seen_training == [False, False, False]  # 2 batches + 1 batch, all in eval
    assert all(model.seen_inference_mode)
    assert model.training
    assert model.linear.training
    assert not model.frozen_part.training


def test_evaluator_records_a_matrix_and_summarises_it() -> None:
    evaluator = Evaluator(_two_mosi_tasks(), family="mosi", batch_size=2)
    model = FirstFeatureRegressor(sign=1.0)
    evaluator.evaluate_and_record(0, model)

    partial = evaluator.summary()
    assert partial["matrix"] == [pytest.approx([200 / 3, 100.0]), [None, None]]
    assert partial["aa"] == pytest.approx(250 / 3)
    assert partial["fm"] is None and partial["bwt"] is None
    assert partial["aa_so_far"] == pytest.approx([200 / 3])

    # Flipping the sign turns every right answer wrong: task "full" keeps 1 of 3 (label -1
    # predicted -2), task "missing_a" none.
    model.set_sign(-1.0)
    evaluator.record(1, evaluator.evaluate(model))

    summary = evaluator.summary()
    assert summary["matrix"] == [pytest.approx([200 / 3, 100.0]), pytest.approx([100 / 3, 0.0])]
    assert summary["aa"] == pytest.approx(50 / 3)  # (100/3 + 0) / 2
    assert summary["fm"] == pytest.approx(100 / 3)  # 200/3 - 100/3
    assert summary["bwt"] == pytest.approx(-100 / 3)
    assert summary["aa_so_far"] == pytest.approx([200 / 3, 50 / 3])
    assert [entry["task"] for entry in summary["per_task_final"]] == ["full", "missing_a"]
    assert summary["per_task_final"][1]["acc"] == pytest.approx(0.0)
    assert [entry["step"] for entry in summary["history"]] == [0, 1]
    assert summary["history"][0]["per_task"][0]["acc"] == pytest.approx(200 / 3)
    json.dumps(summary, allow_nan=False)  # strict JSON: no NaN anywhere


def test_evaluator_summary_turns_nan_metrics_into_none() -> None:
    constant_labels = _task("constant", [1.0, -1.0], [1.0, 1.0])  # Pearson undefined
    evaluator = Evaluator([constant_labels], family="sims")
    evaluator.evaluate_and_record(0, FirstFeatureRegressor())
    summary = evaluator.summary()
    assert summary["per_task_final"][0]["pearson"] is None
    assert summary["aa"] == pytest.approx(50.0)
    json.dumps(summary, allow_nan=False)


def test_evaluator_for_joint_training_has_one_row() -> None:
    evaluator = Evaluator(_two_mosi_tasks(), family="mosi", num_steps=1)
    evaluator.evaluate_and_record(0, FirstFeatureRegressor())
    summary = evaluator.summary()
    assert summary["aa"] == pytest.approx(250 / 3)
    assert summary["fm"] is None and summary["bwt"] is None
    assert summary["aa_so_far"] is None


def test_evaluator_classification_uses_argmax_of_logits() -> None:
    x = torch.tensor([[2.0, 0.0], [0.0, 2.0], [3.0, 1.0], [1.0, 3.0]])
    y = torch.tensor([0, 1, 1, 1])
    task = EvalTask("full", TensorDataset(x, y, torch.zeros(4, dtype=torch.long)))
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))  # logits = x: argmax = [0, 1, 0, 1]
    evaluator = Evaluator([task], family="classification", num_classes=2, batch_size=3)
    (metrics,) = evaluator.evaluate(model)
    assert metrics["acc"] == pytest.approx(75.0)
    # class 0: TP 1, FP 1, FN 0 -> 2/3 (support 1); class 1: TP 2, FN 1 -> 4/5 (support 3)
    assert metrics["f1"] == pytest.approx(100 * (2 / 3 + 3 * 0.8) / 4)


def test_evaluator_rejects_misuse() -> None:
    tasks = _two_mosi_tasks()
    with pytest.raises(CmmmError, match="unique"):
        Evaluator([tasks[0], tasks[0]], family="mosi")
    with pytest.raises(CmmmError, match="num_classes"):
        Evaluator(tasks, family="classification", num_classes=1)
    evaluator = Evaluator(tasks, family="mosi")
    per_task = evaluator.evaluate(FirstFeatureRegressor())
    evaluator.record(0, per_task)
    with pytest.raises(CmmmError, match="already recorded"):
        evaluator.record(0, per_task)
    with pytest.raises(CmmmError, match="expected 2"):
        evaluator.record(1, per_task[:1])
    with pytest.raises(CmmmError, match="undefined"):
        evaluator.record(1, [{"acc": NAN}, {"acc": 50.0}])
