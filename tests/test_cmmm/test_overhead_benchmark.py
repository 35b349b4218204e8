"""The overhead benchmark trains both loops on the same work and reports consistent figures."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cmmm.overhead_benchmark import measure_overhead


def test_both_loops_process_the_same_samples(tiny_config: Callable[..., Any]) -> None:
    config = tiny_config(epochs=2)
    report = measure_overhead(config, log=lambda _: None, rounds=2)
    expected_samples = 2 * 7 * 64  # epochs x tasks x train samples of the tiny stream
    assert report.framework.samples == report.plain.samples == expected_samples
    assert report.framework.seconds > 0 and report.plain.seconds > 0
    assert report.ratio == report.framework.seconds / report.plain.seconds
    assert len(report.framework.rounds) == len(report.plain.rounds) == 2
    assert len(report.round_ratios) == 2
    assert report.plain.fastest <= report.plain.seconds
    rendered = report.table()
    assert rendered.row_count == 2
