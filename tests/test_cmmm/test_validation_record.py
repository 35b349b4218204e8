"""Every run scores each task's validation split after every step, beside its test split."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from cmmm.running import run


def test_results_hold_the_validation_matrix_beside_the_test_matrix(
    tiny_config: Callable[..., Any],
) -> None:
    config = tiny_config(strategy="naive", epochs=1)
    results = run(config)
    valid, test = results["valid"], np.array(results["matrix"], dtype=float)
    matrix = np.array(valid["matrix"], dtype=float)
    assert matrix.shape == test.shape
    # Sequential training: row j is recorded after step j, every task scored.
    assert not np.isnan(matrix).any()
    # Its summaries are the same functions of its own matrix as the test ones.
    assert valid["aa"] == float(np.mean(matrix[-1]))
    assert valid["fm"] is not None
    # A different split: the validation accuracies are not the test accuracies.
    assert not np.array_equal(matrix, test)


def test_joint_training_has_a_one_row_validation_matrix(tiny_config: Callable[..., Any]) -> None:
    results = run(tiny_config(strategy="joint", epochs=1))
    assert np.array(results["valid"]["matrix"], dtype=float).shape == (
        1,
        len(results["stream"]["tasks"]),
    )
    assert results["valid"]["fm"] is None


def test_validation_samples_are_never_test_samples(tiny_config: Callable[..., Any]) -> None:
    """The split the options are chosen on shares no sample with the split reported."""
    from cmmm.running import load_stream

    config = tiny_config().resolved()
    stream = load_stream(config, lambda _: None)
    for task in stream.tasks:
        valid_x, _ = task.valid.tensors()
        test_x, _ = task.test.tensors()
        shared = {tuple(row.tolist()) for row in valid_x} & {tuple(row.tolist()) for row in test_x}
        assert not shared
