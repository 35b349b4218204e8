"""`cmmm summarize`: mean and spread over seeds from finished runs (real ones, see conftest)."""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cmmm.cli import app
from cmmm.errors import DataError
from cmmm.results import find_results
from cmmm.summary import aggregate


def test_groups_by_configuration_and_averages_over_seeds(finished_runs: Path) -> None:
    runs = find_results([finished_runs])
    rows = {row.strategy: row for row in aggregate(runs)}
    assert sorted(rows) == ["joint", "lwf", "naive"]
    naive = sorted((r for r in runs if r.strategy.name == "naive"), key=lambda r: r.seed)
    aa = [r.aa for r in naive]
    fm = [r.fm for r in naive]
    assert rows["naive"].seeds == [0, 1] and rows["lwf"].seeds == [0]
    assert rows["naive"].aa == aa and rows["naive"].fm == fm
    assert rows["naive"].trainable == naive[0].parameters.trainable
    assert rows["naive"].valid_aa == [r.valid.aa for r in naive if r.valid]
    cells = rows["naive"].row()
    assert cells[4] == f"{statistics.mean(aa):.2f} ± {statistics.stdev(aa):.2f}"
    assert cells[5] == f"{statistics.mean(fm):.2f} ± {statistics.stdev(fm):.2f}"
    assert rows["lwf"].row()[4] == f"{rows['lwf'].aa[0]:.2f}"  # one seed: no spread
    assert rows["joint"].row()[5] == "n/a"  # a joint run has no forgetting
    assert "task_order=1,2,3" in rows["naive"].settings


def test_cli_prints_markdown_and_rejects_a_broken_file(
    finished_runs: Path, finished_run, tmp_path: Path
) -> None:
    shutil.copytree(finished_run.directory, tmp_path / finished_run.directory.name)
    result = CliRunner().invoke(app, ["summarize", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "| synthetic | naive |" in result.output
    assert f"{finished_run.aa:.2f}" in result.output
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{not json")
    with pytest.raises(DataError, match="broken"):
        find_results([tmp_path])
    result = CliRunner().invoke(app, ["summarize", str(tmp_path)])
    assert result.exit_code == 2
