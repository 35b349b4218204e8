"""`cmmm tune`: candidates ranked on validation only, the chosen settings and their command."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cmmm.cli import app
from cmmm.errors import ConfigError
from cmmm.outcomes import RunOutcome
from cmmm.results import Results, Validation
from cmmm.tuning import (
    chosen_settings,
    experiment_from_flags,
    parse_grid,
    rank_on_validation,
    run_command,
    tune_table,
)


def test_grid_flags_split_run_settings_from_strategy_options() -> None:
    grid = parse_grid(["lr=1e-3,0.01", "trainable_head=none,pattern", "layers_m=[0,1]"])
    assert grid == {
        "lr": [0.001, 0.01],
        "strategy_options.trainable_head": ["none", "pattern"],
        "strategy_options.layers_m": [[0, 1]],
    }


@pytest.mark.parametrize("flags", [[], ["lr"], ["=1,2"], ["lr="], ["lr=1", "lr=2"]])
def test_bad_grid_flags_are_one_line_errors(flags: list[str]) -> None:
    with pytest.raises(ConfigError):
        parse_grid(flags)


def _result(template: Results, seed: int, valid: float, test: float) -> Results:
    """A real run's results with made-up validation and test AA for ``seed``."""
    return dataclasses.replace(
        template,
        config={**template.config, "seed": seed},
        aa=test,
        fm=1.0,
        valid=Validation(matrix=[[valid]], aa=valid, fm=0.5, per_task_final=[]),
    )


def test_the_ranking_reads_validation_only_and_test_cannot_change_it(
    tmp_path: Path, finished_run: Results
) -> None:
    experiment = experiment_from_flags(
        "synthetic", "ours", parse_grid(["lr=0.001,0.01,0.1"]), [0, 1, 2], {}, tmp_path
    )
    low, mid, high = (row.label for row in experiment.rows)
    # lr=0.001 has the best test AA by far but the worst validation AA: it must rank last.
    valid = {low: [60.0, 61.0, 62.0], mid: [70.0, 71.0, 72.0], high: [65.0, 66.0, 67.0]}
    test = {low: [99.0, 99.0, 99.0], mid: [50.0, 50.0, 50.0], high: [60.0, 60.0, 60.0]}
    outcomes = {
        label: [
            RunOutcome(
                "ours",
                s,
                "reused",
                tmp_path,
                _result(finished_run, s, valid[label][s], test[label][s]),
            )
            for s in range(3)
        ]
        for label in valid
    }
    ranked = rank_on_validation(experiment, outcomes)["ours"]
    assert [c.label for c in ranked] == [mid, high, low]
    table = tune_table(experiment, {"ours": ranked}, "cmmm tune")
    assert f"chosen on validation **{mid}**" in table
    # Every other row is 5 or 10 points below on every seed: the paired interval excludes 0.
    assert "-5.00 ± 0.00 *" in table and "-10.00 ± 0.00 *" in table
    settings = chosen_settings(ranked[0])
    assert settings["lr"] == 0.01 and settings["strategy"] == "ours"
    assert run_command(settings) == "cmmm run --stream synthetic --strategy ours --lr 0.01"


def test_rows_without_validation_results_rank_last_and_choose_nothing(
    tmp_path: Path, finished_run: Results
) -> None:
    experiment = experiment_from_flags(
        "synthetic", "ours", parse_grid(["prompt_length=2,4"]), [0], {}, tmp_path
    )
    first, second = (row.label for row in experiment.rows)
    outcomes = {
        first: [RunOutcome("ours", 0, "missing", tmp_path)],
        second: [RunOutcome("ours", 0, "reused", tmp_path, _result(finished_run, 0, 50.0, 40.0))],
    }
    ranked = rank_on_validation(experiment, outcomes)["ours"]
    assert [c.label for c in ranked] == [second, first]
    assert run_command(chosen_settings(ranked[0])).endswith("--option prompt_length=4")


TINY = """
title = "tiny tune"
stream = "synthetic"
seeds = [0]

[base]
strategy = "ours"
epochs = 1
pretrain_epochs = 1
stream_options = { n_train = 48, n_valid = 16, n_test = 32 }
backbone_options = { layers = 3, self_layers = 1 }
strategy_options = { prompt_length = 2 }

[[rows]]
label = "head none"

[[rows]]
label = "head pattern"
strategy_options = { trainable_head = "pattern" }
"""


def test_tune_runs_a_file_then_ranks_the_finished_runs_without_running_more(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    out = tmp_path / "runs"
    runner = CliRunner()
    result = runner.invoke(app, ["tune", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    chosen = json.loads((out / "tiny.chosen.json").read_text())["ours"]
    assert chosen["label"] in {"head none", "head pattern"}
    assert chosen["seeds"] == [0]
    assert (out / "tiny.md").read_text().count("| ours ") == 2
    again = runner.invoke(app, ["tune", str(path), "--out", str(out), "--finished-only"])
    assert again.exit_code == 0, again.output
    assert "running" not in again.output and again.output.count("reusing") == 2


def test_tune_refuses_a_file_and_a_grid_together(tmp_path: Path) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    result = CliRunner().invoke(app, ["tune", str(path), "--grid", "lr=1,2"])
    assert result.exit_code != 0
    assert "not both" in result.output
