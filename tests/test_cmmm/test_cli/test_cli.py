"""The ``cmmm`` command line: run, its error messages, and data download."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cmmm.cli import app
from streams.mosi import MOSI_FILES

runner = CliRunner()


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def assert_clean_error(result, *fragments: str) -> str:
    """Exit code 2, exactly one one-line ``error:`` message holding ``fragments``, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    # typer.Exit, not the original exception, ended the command.
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = error_lines(result.output)
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def test_run_prints_summary_and_writes_results(tmp_path, monkeypatch) -> None:
    # The CLI has no size flags: this is the default synthetic stream and backbone, 1 epoch.
    monkeypatch.chdir(tmp_path)
    out, cache = tmp_path / "runs", tmp_path / "cache"
    result = runner.invoke(
        app,
        [
            "run",
            "--epochs",
            "1",
            "--pretrain-epochs",
            "1",
            "--out",
            str(out),
            "--cache-dir",
            str(cache),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.exception is None
    # The summary goes to stdout (progress and logs go to stderr).
    summary = re.search(r"AA (\d+\.\d\d)  FM (-?\d+\.\d\d)  BWT (-?\d+\.\d\d)", result.stdout)
    assert summary, result.stdout
    files = list(out.glob("synthetic-naive-seed0-*/results.json"))
    assert len(files) == 1
    results = json.loads(files[0].read_text())
    assert float(summary.group(1)) == pytest.approx(results["aa"], abs=0.005)
    assert float(summary.group(2)) == pytest.approx(results["fm"], abs=0.005)
    # Rich wraps long lines at 80 columns when stdout is not a terminal, so the path may be
    # split across lines.
    assert f"results: {files[0]}" in result.stdout.replace("\n", "")
    assert results["config"]["epochs"] == 1
    assert results["config"]["pretrain_epochs"] == 1
    assert results["config"]["cache_dir"] == str(cache)
    assert len(results["matrix"]) == 7
    # The table shows every task's code as a column and one row per step.
    for code in ("avt", "vt", "av", "at"):
        assert code in result.output
    assert "after step 7:" in result.output
    assert "1: a·v·t" in result.stdout
    # Nothing written outside --out and --cache-dir.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "runs"]


def test_run_unknown_strategy(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(
        app,
        [
            "run",
            "--strategy",
            "nosuch",
            "--out",
            str(tmp_path / "runs"),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
    )
    assert_clean_error(result, "unknown strategy 'nosuch'", "naive", "joint")
    assert not (tmp_path / "runs").exists()


def test_run_unknown_stream(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(
        app,
        [
            "run",
            "--stream",
            "nosuch",
            "--out",
            str(tmp_path / "runs"),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
    )
    assert_clean_error(result, "unknown stream 'nosuch'", "synthetic", "mosi")


def test_run_bad_task_order(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(
        app,
        [
            "run",
            "--task-order",
            "avt,q",
            "--epochs",
            "1",
            "--pretrain-epochs",
            "1",
            "--out",
            str(tmp_path / "runs"),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
    )
    assert_clean_error(result, "'q' is not a pattern")


def test_run_bad_option_syntax(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(
        app,
        [
            "run",
            "-o",
            "novalue",
            "--out",
            str(tmp_path / "runs"),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
    )
    assert_clean_error(result, "key=value")


def test_run_mosi_with_empty_data_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(
        app,
        [
            "run",
            "--stream",
            "mosi",
            "--data-dir",
            str(empty),
            "--out",
            str(tmp_path / "runs"),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
    )
    assert_clean_error(result, str(empty), "cmmm data download mosi")
    assert list(empty.iterdir()) == []


def test_data_download_from_local_mirror(tmp_path, shared_data_dir) -> None:
    source = shared_data_dir / "mosi"
    if not source.is_dir():
        pytest.skip(f"{source} absent")
    target_root = tmp_path / "data"
    result = runner.invoke(
        app, ["data", "download", "mosi", "--from", str(source), "--data-dir", str(target_root)]
    )
    assert result.exit_code == 0, result.output
    assert "all files verified" in result.output
    for entry in MOSI_FILES:
        copied = target_root / "mosi" / entry.path
        assert copied.is_file(), entry.path
        assert copied.stat().st_size == entry.size
        assert copied.read_bytes() == (source / entry.path).read_bytes()
    # A second download finds everything in place.
    again = runner.invoke(
        app, ["data", "download", "mosi", "--from", str(source), "--data-dir", str(target_root)]
    )
    assert again.exit_code == 0, again.output
    assert "already present and verified" in again.output


def test_data_download_unknown_dataset(tmp_path) -> None:
    target = tmp_path / "data"
    result = runner.invoke(app, ["data", "download", "nosuch", "--data-dir", str(target)])
    assert_clean_error(result, "unknown dataset 'nosuch'", "mosi")
    assert not target.exists()


def test_data_download_user_supplied_dataset_says_where_to_put_it(tmp_path) -> None:
    result = runner.invoke(app, ["data", "download", "iemocap", "--data-dir", str(tmp_path)])
    assert_clean_error(result, "no public download", str(Path(tmp_path) / "iemocap"))


def test_parameters_counts_what_a_run_trains_without_training(tmp_path, monkeypatch) -> None:
    """``--parameters`` prints the trainable count a finished run records, and writes nothing;
    ``-s`` sets stream options (here a small synthetic stream)."""
    monkeypatch.chdir(tmp_path)
    common = ["run", "--strategy", "ours", "--epochs", "1", "--pretrain-epochs", "1"]
    common += ["-s", "n_train=48", "-s", "n_valid=16", "-s", "n_test=32", "--device", "cpu"]
    common += ["--out", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]
    counted = runner.invoke(app, [*common, "--parameters"])
    assert counted.exit_code == 0, counted.output
    found = re.search(r"ours over 7 tasks: trainable parameters ([\d,]+) \(", counted.stdout)
    assert found, counted.stdout
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()
    trained = runner.invoke(app, common)
    assert trained.exit_code == 0, trained.output
    (results_file,) = (tmp_path / "runs").glob("synthetic-ours-seed0-*/results.json")
    results = json.loads(results_file.read_text())
    assert results["config"]["stream_options"] == {"n_train": 48, "n_valid": 16, "n_test": 32}
    assert int(found.group(1).replace(",", "")) == results["parameters"]["trainable"]
    assert_clean_error(runner.invoke(app, ["run", "-s", "n_train"]), "--stream-option", "key=value")
