"""The sweep benchmark makes the same runs in one process and on Ray; its figures agree."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import ray

from cmmm.errors import ConfigError
from cmmm.sweep_benchmark import measure_sweep_throughput


def test_one_process_and_ray_make_the_same_runs(
    tiny_config: Callable[..., Any], tmp_path: Path
) -> None:
    out = tmp_path / "benchmark"
    report = measure_sweep_throughput(
        tiny_config(), runs=2, out=out, worker_counts=(1,), log=lambda _: None
    )
    assert not ray.is_initialized()  # the benchmark's Ray is shut down
    for mode in ("sequential", "ray-1-workers"):
        finished = sorted(p.parent.name for p in (out / mode).glob("*/results.json"))
        assert [name.split("-")[2] for name in finished] == ["seed0", "seed1"], mode
    (single,) = report.on_ray
    assert single.workers == 1 and single.runs == report.sequential.runs == 2
    assert single.startup_seconds > 0 and single.run_seconds > 0
    expected = (single.total_seconds - report.sequential.total_seconds) / 2
    assert report.overhead_per_run(include_startup=True) == pytest.approx(expected)
    assert report.sequential.runs_per_minute == pytest.approx(120 / report.sequential.run_seconds)
    assert report.table().row_count == 2


def test_bad_arguments_are_refused_before_any_run(
    tiny_config: Callable[..., Any], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="--runs"):
        measure_sweep_throughput(tiny_config(), runs=0, out=tmp_path)
    with pytest.raises(ConfigError, match="--workers"):
        measure_sweep_throughput(tiny_config(), runs=1, out=tmp_path, worker_counts=(0,))
