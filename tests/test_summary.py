"""`cmmm summarize`: mean and spread over seeds from finished runs."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cmmm.cli import app
from cmmm.errors import DataError
from cmmm.results import find_results
from cmmm.summary import aggregate


def write_result(root: Path, strategy: str, seed: int, aa: float, fm: float | None) -> None:
    run_dir = root / f"{strategy}-{seed}"
    run_dir.mkdir(parents=True)
    result = {
        "config": {
            "stream": "synthetic",
            "strategy": strategy,
            "seed": seed,
            "epochs": 5,
            "task_order": "default",
            "task_data": "full",
        },
        "strategy": {"name": strategy, "joint": strategy == "joint"},
        "stream": {"tasks": [{"name": "a·v·t"}, {"name": "v·t, a missing"}]},
        "matrix": [[aa, None], [aa, aa]] if strategy != "joint" else [[aa, aa]],
        "aa": aa,
        "fm": fm,
        "bwt": None if fm is None else -fm,
        "wall_time_seconds": 10.0 + seed,
        "parameters": {"trainable": 123},
    }
    (run_dir / "results.json").write_text(json.dumps(result))


def test_groups_by_configuration_and_averages_over_seeds(tmp_path: Path) -> None:
    for seed, (aa, fm) in enumerate([(60.0, 4.0), (64.0, 2.0), (62.0, -0.5)]):
        write_result(tmp_path, "naive", seed, aa, fm)
    write_result(tmp_path, "joint", 0, 70.0, None)
    rows = {row.strategy: row for row in aggregate([r.data for r in find_results([tmp_path])])}
    assert rows["naive"].seeds == [0, 1, 2]
    assert statistics.mean(rows["naive"].aa) == pytest.approx(62.0)
    cells = rows["naive"].row()
    assert cells[4] == f"62.00 ± {statistics.stdev([60.0, 64.0, 62.0]):.2f}"
    assert (
        cells[5]
        == f"{statistics.mean([4.0, 2.0, -0.5]):.2f} ± {statistics.stdev([4.0, 2.0, -0.5]):.2f}"
    )
    assert rows["joint"].row()[5] == "n/a"


def test_cli_prints_markdown_and_rejects_a_broken_file(tmp_path: Path) -> None:
    write_result(tmp_path, "naive", 0, 61.5, 3.0)
    result = CliRunner().invoke(app, ["summarize", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "| synthetic | naive |" in result.output and "61.50" in result.output
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{not json")
    with pytest.raises(DataError, match="broken"):
        find_results([tmp_path])
    result = CliRunner().invoke(app, ["summarize", str(tmp_path)])
    assert result.exit_code == 2
