"""`cmmm summarize`: mean and spread over seeds from finished runs (real ones, see conftest)."""

from __future__ import annotations

import dataclasses
import shutil
import statistics
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cmmm.cli import app
from cmmm.errors import DataError
from cmmm.results import Results, find_results
from cmmm.summary import SeedStatistics, aggregate, paired_differences, unpaired_note


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


def test_runs_pair_only_when_they_started_from_the_same_backbone(finished_runs: Path) -> None:
    """A seed's runs pair only if they started from the same pre-trained weights: the same
    seed pre-trained on another CPU gets other weights (and the same cache key)."""
    naive = sorted(
        (r for r in find_results([finished_runs]) if r.strategy.name == "naive"),
        key=lambda r: r.seed,
    )
    assert [r.seed for r in naive] == [0, 1]
    assert all(len(r.pretraining["weights_sha256"]) == 64 for r in naive)

    def other_row(*runs: Results) -> list[Results]:
        return [dataclasses.replace(r, aa=r.aa + 1.0 + r.seed) for r in runs]

    def elsewhere(run: Results, **record: object) -> Results:
        return dataclasses.replace(run, pretraining={**run.pretraining, **record})

    reference = SeedStatistics.of(naive)
    same = {"naive": reference, "other": SeedStatistics.of(other_row(*naive))}
    [(interval, seeds)] = [d for d in paired_differences(same, "naive").values() if d]
    assert seeds == [0, 1] and interval.mean == pytest.approx(1.5)
    assert unpaired_note(same, "naive") == ""

    # Seed 1 of the other row ran from other weights: only seed 0 pairs, and the table says so.
    moved = other_row(naive[0], elsewhere(naive[1], weights_sha256="0" * 64))
    mixed = {"naive": reference, "other": SeedStatistics.of(moved)}
    assert mixed["other"].pairable_seeds(reference) == {0}
    assert mixed["other"].unpairable_seeds(reference) == [1]
    difference = paired_differences(mixed, "naive")["other"]
    assert difference is not None and difference[1] == [0]
    note = unpaired_note(mixed, "naive")
    assert note.startswith("Not paired with naive") and "other seed 1." in note

    # Runs recorded before the fingerprint existed are told apart by key and valid loss.
    old = [elsewhere(r, weights_sha256=None) for r in naive]
    assert old[0].backbone.same_as(naive[0].backbone)
    retrained = elsewhere(old[0], valid_loss=old[0].pretraining["valid_loss"] + 1e-3)
    assert not retrained.backbone.same_as(naive[0].backbone)
    assert not retrained.backbone.same_as(old[0].backbone)
