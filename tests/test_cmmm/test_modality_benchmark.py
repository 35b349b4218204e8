"""`cmmm benchmark modalities`: one run per (M, strategy), reused when finished, and a table
whose numbers are the runs' own."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import cmmm.running
from cmmm.backbone import MulTConfig
from cmmm.cli import app
from cmmm.errors import ConfigError
from cmmm.modality_benchmark import (
    MODALITY_NAMES,
    ModalityBenchmark,
    benchmark_modalities,
    parse_modality_counts,
    synthetic_modality_options,
)
from streams.synthetic import SyntheticSpec

COUNTS = (3, 4)
STRATEGIES = ("ours", "ours-compositional")
PROMPT_LENGTH = 4
N_TRAIN, N_TEST = 24, 8
runner = CliRunner()


def quiet(_: str) -> None:
    pass


def tiny_base(root: Path, tiny_config_at: Callable[..., Any]) -> Any:
    # One pre-training epoch, not 0: pretrained_backbone cannot log the validation loss of zero
    # epochs (there is none).
    # A one-layer backbone has only layer 0, so every prompt type goes there.
    options = {
        "layers_m": [0],
        "layers_ta": [0],
        "layers_ts": [0],
        "prompt_length": PROMPT_LENGTH,
    }
    return tiny_config_at(root, pretrain_epochs=1, strategy_options=options, stream_options={})


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory, tiny_config_at) -> tuple[Any, ModalityBenchmark]:
    base = tiny_base(tmp_path_factory.mktemp("modalities"), tiny_config_at)
    report = benchmark_modalities(
        base, COUNTS, STRATEGIES, n_train=N_TRAIN, n_test=N_TEST, log=quiet
    )
    return base, report


def results_of(row: Any) -> dict[str, Any]:
    return json.loads(Path(row.results_path).read_text())


def markdown_rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| M | method |")
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines[1:]]


def test_one_row_per_modality_count_and_strategy(benchmark) -> None:
    _, report = benchmark
    assert [(row.modalities, row.strategy) for row in report.rows] == [
        (m, s) for m in COUNTS for s in STRATEGIES
    ]
    for row in report.rows:
        assert row.status == "ran", row.error
        assert row.tasks == 2**row.modalities - 1
        result = results_of(row)
        assert result["stream"]["modalities"] == list(MODALITY_NAMES[: row.modalities])
        assert len(result["matrix"]) == row.tasks
        assert result["strategy"]["name"] == row.strategy


def test_task_specific_parameters_follow_each_form(benchmark) -> None:
    _, report = benchmark
    by_key = {(row.modalities, row.strategy): row for row in report.rows}
    for m in COUNTS:
        per_pattern, composed = by_key[m, "ours"], by_key[m, "ours-compositional"]
        options = results_of(per_pattern)["strategy"]["options"]
        backbone = results_of(per_pattern)["config"]["backbone_options"]
        width = backbone.get("d_model", MulTConfig().d_model)
        assert options["prompt_length"] == PROMPT_LENGTH
        assert results_of(composed)["strategy"]["options"]["task_specific_form"] == "compositional"
        one_set = m * PROMPT_LENGTH * width  # one (L, d) prompt per target branch
        assert per_pattern.task_specific == (2**m - 1) * one_set
        assert composed.task_specific == 2 * m * one_set
        # The two differ in their task-specific prompts (all trained) and in ours' default
        # output layer per pattern (a (1, M(M-1)d) regression layer and its bias each).
        heads = (2**m - 1) * (m * (m - 1) * width + 1)
        assert (
            per_pattern.trainable - composed.trainable
            == per_pattern.task_specific - composed.task_specific + heads
        )


def test_tables_hold_the_runs_numbers(benchmark, tmp_path: Path) -> None:
    base, report = benchmark
    rows = markdown_rows(report.markdown())
    assert len(rows) == len(report.rows)
    for cells, row in zip(rows, report.rows, strict=True):
        result = results_of(row)
        assert cells == [
            str(row.modalities),
            row.strategy,
            str(len(result["stream"]["tasks"])),
            f"{result['parameters']['trainable']:,}",
            f"{row.task_specific:,}",
            f"{result['aa']:.2f}",
            f"{result['fm']:.2f}",
            f"{result['train_time_seconds']:.1f}",
            f"{result['wall_time_seconds']:.1f}"
            + (" *" if not result["pretraining"]["cached"] else ""),
        ]
    # The first run of each M pre-trains the backbone the second one reuses.
    assert [row.pretrained_here for row in report.rows] == [True, False] * len(COUNTS)
    header = report.header()
    for fragment in ("synthetic", f"epochs {base.epochs}", "pretrain epochs 1", "seed 0"):
        assert fragment in header
    assert f"n_train {N_TRAIN}" in header and header in report.markdown()
    assert report.table().row_count == len(report.rows)

    markdown_path, csv_path = report.write(tmp_path)
    assert markdown_path.read_text() == report.markdown()
    records = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    for record, row in zip(records, report.rows, strict=True):
        result = results_of(row)
        assert float(record["aa"]) == result["aa"] and float(record["fm"]) == result["fm"]
        assert float(record["wall_seconds"]) == result["wall_time_seconds"]
        assert int(record["trainable"]) == result["parameters"]["trainable"]


def test_a_second_call_reuses_the_finished_runs(benchmark, monkeypatch) -> None:
    base, first = benchmark
    mtimes = {row.results_path: Path(row.results_path).stat().st_mtime_ns for row in first.rows}

    def must_not_run(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(cmmm.running, "run", must_not_run)
    again = benchmark_modalities(
        base, COUNTS, STRATEGIES, n_train=N_TRAIN, n_test=N_TEST, log=quiet
    )
    assert [row.status for row in again.rows] == ["reused"] * len(first.rows)
    assert {row.results_path: Path(row.results_path).stat().st_mtime_ns for row in again.rows} == (
        mtimes
    )
    assert again.markdown() == first.markdown()


def test_extra_modalities_are_as_informative_as_audio() -> None:
    defaults = SyntheticSpec()
    options = synthetic_modality_options(6, n_train=10, n_test=5)
    assert options["modalities"] == list(MODALITY_NAMES)
    for key in ("seq_lens", "feature_dims", "signal"):
        assert options[key][:3] == list(getattr(defaults, key))
    columns = (options["signal"], options["seq_lens"], options["feature_dims"])
    evidence = [s * s * n * d for s, n, d in zip(*columns, strict=True)]
    for extra in evidence[3:]:
        assert extra == pytest.approx(evidence[0], rel=0.01)  # audio's
        assert evidence[1] < extra < evidence[2]  # stronger than video, weaker than text
    # Distinct first letters: pattern codes are made of them.
    assert len({name[0] for name in MODALITY_NAMES}) == len(MODALITY_NAMES)
    assert synthetic_modality_options(4, 10, 5)["signal"] == options["signal"][:4]


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("1,3", "2 to 6"),
        ("3,7", "2 to 6"),
        ("3,x", "comma-separated integers"),
        ("3,3", "more than once"),
        ("", "names no modality count"),
    ],
)
def test_bad_modality_counts_are_refused(spec: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        parse_modality_counts(spec)


def error_line(result: Any) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--modalities", "1,3"], ["--modalities 1", "2 to 6"]),
        (["--modalities", "8"], ["--modalities 8", "2 to 6"]),
        (["--modalities", "three"], ["--modalities 'three'", "comma-separated integers"]),
        (["--strategies", "ours,nope"], ["nope"]),
        (["--n-test", "0"], ["--n-test must be >= 1"]),
    ],
)
def test_cli_errors_say_what_was_wrong(tmp_path: Path, flags: list[str], fragments: list[str]):
    result = runner.invoke(app, ["benchmark", "modalities", "--out", str(tmp_path), *flags])
    line = error_line(result)
    for fragment in fragments:
        assert fragment in line, line
    assert not list(tmp_path.iterdir())  # refused before any run


def test_cli_prints_and_writes_the_table(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = runner.invoke(
        app,
        [
            "benchmark",
            "modalities",
            "--modalities",
            "2",
            "--strategies",
            "ours",
            "--epochs",
            "1",
            "--pretrain-epochs",
            "1",
            "--n-train",
            "16",
            "--n-test",
            "8",
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    markdown = (out / "modality-benchmark.md").read_text()
    assert markdown in result.stdout
    [cells] = markdown_rows(markdown)
    [results_path] = out.glob("synthetic-ours-seed0-*/results.json")
    result_data = json.loads(results_path.read_text())
    assert cells[:3] == ["2", "ours", "3"]
    assert cells[5] == f"{result_data['aa']:.2f}"
    assert (out / "modality-benchmark.csv").exists()
