"""Experiment files: parsing, merging of options, and the table they produce."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cmmm.cli import app
from cmmm.errors import ConfigError
from cmmm.experiments import load_experiment, run_experiment
from cmmm.strategy import STRATEGIES

REPO = Path(__file__).resolve().parents[2]

TINY = """
title = "tiny"
stream = "synthetic"
seeds = [0, 1]

[base]
strategy = "ours"
epochs = 1
pretrain_epochs = 1
stream_options = { n_train = 48, n_valid = 16, n_test = 32 }
backbone_options = { layers = 3, self_layers = 1 }
strategy_options = { lam = 0.0, prompt_length = 2 }

[[rows]]
label = "naive"
strategy = "naive"

[[rows]]
label = "P_TS only"
paper = "1.0 / 2.0"
strategy_options = { use_modality = false, use_task_aware = false }
"""


def scored_outcomes(
    experiment, finished_run, where: Path, scores: dict[str, list[float]], **changes_of
) -> dict[str, list]:
    """Outcomes of ``experiment``'s rows made of a real run's results with made-up scores:
    seed s of a row gets ``scores[row][s]`` through ``changes_of`` (field name -> a function of
    the score giving that field's value; default: the score is the AA) and no validation
    scores unless ``changes_of`` gives some."""
    import dataclasses

    from cmmm.outcomes import RunOutcome

    changes_of = changes_of or {"aa": lambda score: score}
    outcomes: dict[str, list] = {row.label: [] for row in experiment.rows}
    for label, values in scores.items():
        for seed, score in enumerate(values):
            changes = {"valid": None, **{name: f(score) for name, f in changes_of.items()}}
            config = {**finished_run.config, "seed": seed}
            result = dataclasses.replace(finished_run, config=config, **changes)
            outcomes[label].append(RunOutcome(label, seed, "ran", where, result))
    return outcomes


def test_rows_merge_options_and_other_strategies_do_not_inherit(tmp_path: Path) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    experiment = load_experiment(path, {"out": str(tmp_path / "runs")})
    naive, prompts = experiment.rows
    assert naive.config.strategy == "naive" and naive.config.strategy_options == {}
    assert prompts.config.strategy_options == {
        "lam": 0.0,
        "prompt_length": 2,
        "use_modality": False,
        "use_task_aware": False,
    }
    assert prompts.config.backbone_options == {"layers": 3, "self_layers": 1}
    assert prompts.config.out == str(tmp_path / "runs")


def test_bad_files_say_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('seeds = [0]\n[[rows]]\nlabel = "x"\nepochz = 3\n')
    with pytest.raises(ConfigError, match="epochz"):
        load_experiment(path)
    path.write_text("seeds = [0]\n")
    with pytest.raises(ConfigError, match="rows"):
        load_experiment(path)
    path.write_text("not = [toml")
    with pytest.raises(ConfigError, match="TOML"):
        load_experiment(path)


def test_every_shipped_experiment_file_is_valid() -> None:
    files = sorted((REPO / "experiments").rglob("*.toml"))
    assert {f.stem for f in files} >= {"main", "table3", "table4", "table5", "table6", "figure5"}
    for file in files:
        for row in load_experiment(file).rows:
            row.config.resolved()
            STRATEGIES.get(row.config.strategy).factory(**row.config.strategy_options)


def test_run_writes_a_table_and_reuses_finished_runs(tmp_path: Path) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    overrides = {"out": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache")}
    experiment = load_experiment(path, overrides)
    table, written = run_experiment(experiment, tmp_path / "runs", log=lambda _: None)
    assert written.read_text() == table
    assert "| naive |" in table and "| P_TS only |" in table and "1.0 / 2.0" in table
    messages: list[str] = []
    figure = tmp_path / "rows.png"
    run_experiment(experiment, tmp_path / "runs", log=messages.append, figure=figure)
    assert sum("reusing" in m for m in messages) == 4
    assert not any(m.endswith(": running") for m in messages)
    assert figure.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    # --finished-only with one seed more than ran: the new seed is listed, never run.
    experiment.seeds = [*experiment.seeds, 9]
    messages.clear()
    table, _ = run_experiment(
        experiment, tmp_path / "runs", log=messages.append, finished_only=True
    )
    assert sum("not finished; not run" in m for m in messages) == 2
    assert not any(m.endswith(": running") for m in messages)
    experiment.seeds = experiment.seeds[:-1]

    # The figure plots each row's seed mean, in the file's order.
    from cmmm.experiments import experiment_figure
    from cmmm.outcomes import run_or_reuse
    from cmmm.running import RunConfig

    outcomes = {
        row.label: [
            run_or_reuse(RunConfig(**{**row.config.__dict__, "seed": s}).resolved(), "", print)
            for s in experiment.seeds
        ]
        for row in experiment.rows
    }
    fig = experiment_figure(experiment, outcomes)
    for row in experiment.rows:
        [line] = [
            ln for ax in fig.axes for ln in ax.get_lines() if ln.get_gid() == f"aa|{row.label}"
        ]
        expected = sum(o.result.aa for o in outcomes[row.label]) / len(experiment.seeds)
        assert line.get_ydata()[0] == pytest.approx(expected)
    assert "tiny" in fig._suptitle.get_text()

    result = CliRunner().invoke(
        app,
        [
            "experiment",
            str(path),
            "--seeds",
            "0",
            "--out",
            str(tmp_path / "runs"),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "| P_TS only |" in result.output


def test_tables_pair_rows_with_the_reference_and_add_headroom_rows(
    tmp_path: Path, finished_run
) -> None:
    import dataclasses

    from cmmm.experiments import DEFAULT_SEEDS, markdown_table, with_headroom_rows

    path = tmp_path / "pair.toml"
    path.write_text(
        'stream = "synthetic"\n[base]\nstrategy = "naive"\n'
        '[[rows]]\nlabel = "base"\n[[rows]]\nlabel = "ewc"\nstrategy = "ewc"\n'
    )
    experiment = load_experiment(path)
    assert experiment.seeds == DEFAULT_SEEDS and experiment.reference_label() == "base"
    experiment = with_headroom_rows(experiment, {"out": str(tmp_path)})
    assert [(r.label, r.config.strategy) for r in experiment.rows][2:] == [
        ("zeroshot", "zeroshot"),
        ("joint", "joint"),
    ]
    # ewc - base: 1, 1.5, 1 over seeds 0-2 -> +1.17 ± 4.3027 * 0.2887 / sqrt(3) = 0.72.
    aa = {"base": [60.0, 62.0, 61.0], "ewc": [61.0, 63.5, 62.0]}
    parameters = dataclasses.replace(finished_run.parameters, trainable=1)
    outcomes = scored_outcomes(
        experiment,
        finished_run,
        tmp_path,
        aa,
        aa=lambda score: score,
        fm=lambda _: 1.0,
        parameters=lambda _: parameters,
        wall_time_seconds=lambda _: 1.0,
    )
    table = markdown_table(experiment, outcomes)
    # ewc AA 61, 63.5, 62: s = sqrt(1.5833) = 1.2583, half-width 4.3027 * 1.2583 / sqrt(3) = 3.13.
    assert "| ewc | 62.17 ± 3.13 | 1.00 ± 0.00 | +1.17 ± 0.72 * |" in table
    assert "**1 of 3 rows differ significantly from base** (2 with fewer than 2 paired" in table
    experiment.reference = "nope"
    with pytest.raises(ConfigError, match="not a row label"):
        experiment.reference_label()


def test_rows_get_a_verdict_against_the_papers_direction(tmp_path: Path, finished_run) -> None:
    """A row's claim is its own (``claim``) or its paper AA against the reference row's; the
    verdict column and footer say whether the paired interval agrees."""
    import csv
    import io

    from cmmm.experiments import csv_table, markdown_table, paper_claims

    path = tmp_path / "claims.toml"
    path.write_text(
        'stream = "synthetic"\nreference = "full"\nheadroom = false\n[base]\n'
        'strategy = "naive"\n'
        '[[rows]]\nlabel = "full"\npaper = "71.87 / 0.13"\n'
        '[[rows]]\nlabel = "ablated"\nstrategy = "ewc"\npaper = "70.06 / 0.23"\n'
        '[[rows]]\nlabel = "stated"\nstrategy = "lwf"\nclaim = "above"\n'
        '[[rows]]\nlabel = "unclaimed"\nstrategy = "si"\n'
    )
    experiment = load_experiment(path)
    assert paper_claims(experiment) == {"ablated": "below", "stated": "above"}
    # ablated - full: -2, -2.5, -3 (excludes 0, paper: below); stated - full: +1, -1, +0.5.
    aa = {
        "full": [60.0, 62.0, 61.0],
        "ablated": [58.0, 59.5, 58.0],
        "stated": [61.0, 61.0, 61.5],
        "unclaimed": [60.0, 62.0, 61.0],
    }
    outcomes = scored_outcomes(experiment, finished_run, tmp_path, aa)
    table_of = (experiment, outcomes)
    table = markdown_table(*table_of)
    lines = {line.split(" | ")[0][2:]: line for line in table.splitlines() if line[:2] == "| "}
    assert lines["full"].endswith("| reference |")
    assert lines["ablated"].endswith("| 70.06 / 0.23 | reproduced (below) |")
    assert lines["stated"].endswith("| undecided (above) |")
    assert lines["unclaimed"].endswith("|  |  |")
    assert "**1 reproduced, 0 not reproduced, 1 undecided**" in table
    records = {r["configuration"]: r for r in csv.DictReader(io.StringIO(csv_table(*table_of)))}
    assert (records["ablated"]["paper_claim"], records["ablated"]["verdict"]) == (
        "below",
        "reproduced",
    )
    assert records["unclaimed"]["verdict"] == records["full"]["verdict"] == ""
    path.write_text(path.read_text().replace('claim = "above"', 'claim = "better"'))
    with pytest.raises(ConfigError, match="row 3: claim must be one of"):
        load_experiment(path)


def test_the_table_names_the_row_chosen_on_validation(tmp_path: Path) -> None:
    """Two learning rates: the table shows each row's validation AA and names the row with the
    higher one, whatever the test AA says."""
    import json
    import statistics

    path = tmp_path / "lr.toml"
    path.write_text(
        TINY.split("[[rows]]")[0]
        + '[[rows]]\nlabel = "lr 1e-3"\nstrategy = "naive"\n'
        + '[[rows]]\nlabel = "lr 3e-2"\nstrategy = "naive"\nlr = 0.03\n'
    )
    experiment = load_experiment(path, {"out": str(tmp_path / "runs")})
    table, _ = run_experiment(experiment, tmp_path / "runs", log=lambda _: None)
    assert "AA valid (%)" in table
    valid = {}
    for run_dir in (tmp_path / "runs").iterdir():
        results_file = run_dir / "results.json"
        if results_file.is_file():
            results = json.loads(results_file.read_text())
            label = "lr 3e-2" if results["config"]["lr"] == 0.03 else "lr 1e-3"
            if results["config"]["strategy"] == "naive":
                valid.setdefault(label, []).append(results["valid"]["aa"])
    best = max(valid, key=lambda label: statistics.mean(valid[label]))
    assert f"Chosen on validation: **{best}**" in table


def test_the_choice_on_validation_compares_rows_on_their_common_seeds(
    tmp_path: Path, finished_run
) -> None:
    """A row with fewer finished seeds is compared on those seeds only: here "partial" is
    better than "full" on seeds 0-1, though "full" has the higher mean over its five seeds."""
    import dataclasses

    from cmmm.experiments import chosen_on_validation

    assert finished_run.valid is not None
    path = tmp_path / "choice.toml"
    path.write_text(
        'stream = "synthetic"\nheadroom = false\n[base]\nstrategy = "naive"\n'
        '[[rows]]\nlabel = "full"\n[[rows]]\nlabel = "partial"\nstrategy = "ewc"\n'
    )
    experiment = load_experiment(path)
    valid = {"full": [80.0, 80.0, 90.0, 90.0, 90.0], "partial": [85.0, 85.0]}
    outcomes = scored_outcomes(
        experiment,
        finished_run,
        tmp_path,
        valid,
        valid=lambda score: dataclasses.replace(finished_run.valid, aa=score),
    )
    assert chosen_on_validation(experiment, outcomes) == "partial"
    outcomes["partial"] = outcomes["partial"][:0]
    assert chosen_on_validation(experiment, outcomes) == "full"
