"""Hostile arguments and failures at the command line: one line and an exit code, never a
traceback; nothing already written is lost.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import cmmm.atomic_files
import cmmm.running
import streams.download as download
from cmmm.atomic_files import atomic_write_text
from cmmm.checkpoints import CHECKPOINT_FILE
from cmmm.cli import app
from cmmm.errors import DownloadError
from cmmm.run_guard import LOCK_FILE, DivergenceError, DivergenceGuard, RunDirectoryBusyError
from streams.mosi import MOSI_FILES

runner = CliRunner()


def one_line_error(result: Any, code: int = 2) -> str:
    """The command's error line, after checking the exit code and that nothing else came out."""
    output = result.output
    assert result.exit_code == code, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert errors, output
    # Rich may wrap a long line at the terminal width: the message is everything from "error:".
    return " ".join(lines[lines.index(errors[0]) :])


@pytest.mark.parametrize(
    ("arguments", "reason"),
    [
        (["--seed", "-1"], "--seed must be a whole number from 0"),
        (["--lr", "inf"], "--lr must be finite"),
        (["--lr", "nan"], "--lr must be finite"),
        (["--lr", "1e30"], "--lr must be <= 10"),
        (["--epochs", "1000000000"], "--epochs must be <= 10000"),
        (["--batch-size", "100000000"], "--batch-size must be <= 65536"),
        (["--strategy", "ours", "-o", "prompt_length=100000000"], "prompt_length must be <= 1024"),
        (["--strategy", "l2p", "-o", "pool_size=10000000000"], "pool_size must be <= 1000000"),
    ],
    ids=["seed", "lr-inf", "lr-nan", "lr-huge", "epochs", "batch", "prompt", "pool"],
)
def test_bad_settings_are_one_line_errors_before_anything_runs(
    arguments: list[str], reason: str
) -> None:
    started = time.monotonic()
    result = runner.invoke(app, ["run", *arguments, "--dry-run"])
    assert reason in one_line_error(result)
    assert time.monotonic() - started < 30


def test_config_files_that_are_binary_mistyped_or_nested(tmp_path: Path) -> None:
    cases = {
        "binary.toml": (bytes(range(256)) * 4, "not a text file"),
        "typed.toml": (b'epochs = "ten"\n', "--epochs must be a whole number"),
        "seed.toml": (b"seed = 1.5\n", "--seed must be a whole number"),
        "options.toml": (b'strategy_options = "x"\n', "strategy_options must be a table"),
        "deep.json": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    }
    for name, (content, reason) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        message = one_line_error(runner.invoke(app, ["run", "--config", str(path), "--dry-run"]))
        assert reason in message and name in message, message


def tiny_run_arguments(tmp_path: Path, out: Path) -> list[str]:
    config = tmp_path / "tiny.toml"
    config.write_text(
        "epochs = 1\npretrain_epochs = 1\ndevice = 'cpu'\n"
        f"cache_dir = '{tmp_path / 'cache'}'\n"
        "[stream_options]\nn_train = 32\nn_valid = 8\nn_test = 16\n"
        "[backbone_options]\nlayers = 1\nself_layers = 1\n"
    )
    return ["run", "--config", str(config), "--out", str(out)]


def test_out_naming_a_file(tmp_path: Path) -> None:
    out = tmp_path / "a-file"
    out.write_text("keep me")
    message = one_line_error(runner.invoke(app, tiny_run_arguments(tmp_path, out)))
    assert "--out must name a directory" in message and str(out) in message
    assert out.read_text() == "keep me"


def test_full_disk_at_the_first_checkpoint(tmp_path: Path, monkeypatch) -> None:
    def disk_full(descriptor: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cmmm.atomic_files.os, "fsync", disk_full)
    out = tmp_path / "runs"
    message = one_line_error(runner.invoke(app, tiny_run_arguments(tmp_path, out)))
    assert "No space left on device" in message and "free disk space" in message
    # The message names the file that could not be written, and no partial file is left.
    assert str(tmp_path) in message
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize(
    ("raised", "code", "expected"),
    [
        (KeyboardInterrupt(), 130, "interrupted; every checkpoint written so far is kept"),
        (MemoryError(), 2, "out of memory; lower --batch-size"),
        (PermissionError(errno.EACCES, "Permission denied", "/some/where"), 2, "/some/where"),
        (ZeroDivisionError("division by zero"), 2, "unexpected ZeroDivisionError"),
    ],
    ids=["ctrl-c", "memory", "oserror", "unexpected"],
)
def test_any_failure_is_one_line(
    tmp_path: Path, monkeypatch, raised: BaseException, code: int, expected: str
) -> None:
    def fails(*args: object, **kwargs: object) -> None:
        raise raised

    monkeypatch.setattr(cmmm.running, "run", fails)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # so that TMPDIR is read again
    message = one_line_error(runner.invoke(app, tiny_run_arguments(tmp_path, tmp_path)), code)
    assert expected in message, message
    if isinstance(raised, ZeroDivisionError):
        (saved,) = tmp_path.glob("cmmm-crash-*.txt")
        assert str(saved) in message
        assert "ZeroDivisionError: division by zero" in saved.read_text()


def test_second_writer_of_a_run_directory_is_refused(tiny_config) -> None:
    config = tiny_config()
    run_dir = config.resolved().run_dir()
    run_dir.mkdir(parents=True)
    with open(run_dir / LOCK_FILE, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunDirectoryBusyError, match="being written by another") as info:
            cmmm.running.run(config, log=lambda _: None)
    assert str(run_dir) in str(info.value) and "\n" not in str(info.value)
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]


def test_interrupted_run_keeps_its_checkpoint(tiny_config, monkeypatch) -> None:
    config = tiny_config()
    scored_steps: set[int] = set()
    original = cmmm.running.Evaluator.evaluate_and_record

    def interrupt_at_second_step(self: Any, step: int, model: Any) -> Any:
        if step == 1:
            raise KeyboardInterrupt
        scored_steps.add(step)  # by the test and the validation evaluators
        return original(self, step, model)

    monkeypatch.setattr(cmmm.running.Evaluator, "evaluate_and_record", interrupt_at_second_step)
    with pytest.raises(KeyboardInterrupt):
        cmmm.running.run(config, log=lambda _: None)
    run_dir = config.resolved().run_dir()
    assert (run_dir / CHECKPOINT_FILE).is_file() and scored_steps == {0}
    # The lock is released: the run can be resumed at once.
    monkeypatch.undo()
    results = cmmm.running.run(config, log=lambda _: None, resume=True)
    assert len(results["matrix"]) == len(results["stream"]["tasks"])


# --------------------------------------------------------------------------------------------
# Non-finite loss


class FakeStrategy(SimpleNamespace):
    loss: torch.Tensor


def test_divergence_guard_names_step_epoch_and_batch_without_per_batch_sync() -> None:
    guard = DivergenceGuard(num_steps=4, hint="lower --lr", check_every=50)
    strategy = FakeStrategy(loss=torch.tensor(1.0))
    guard.start_step(1)
    for epoch in range(2):
        guard.before_training_epoch(strategy)
        for batch in range(10):
            bad = epoch == 1 and batch >= 6
            strategy.loss = torch.tensor(float("nan") if bad else 0.5)
            # Read only every 50 batches: no error (and no host sync) inside the epoch here.
            guard.after_training_iteration(strategy)
        if epoch == 0:
            guard.after_training_epoch(strategy)
    with pytest.raises(DivergenceError) as info:
        guard.after_training_epoch(strategy)
    message = str(info.value)
    assert "step 2 of 4, epoch 2, batch 7" in message and "lower --lr" in message


def test_divergence_guard_stops_within_check_every_batches() -> None:
    guard = DivergenceGuard(num_steps=1, hint="x", check_every=4)
    strategy = FakeStrategy(loss=torch.tensor(float("inf")))
    guard.start_step(0)
    guard.before_training_epoch(strategy)
    for _ in range(3):
        guard.after_training_iteration(strategy)
    with pytest.raises(DivergenceError, match="epoch 1, batch 1"):
        guard.after_training_iteration(strategy)


def test_diverging_run_stops_with_the_error_and_keeps_no_results(tiny_config, monkeypatch) -> None:
    config = tiny_config()
    from avalanche.training.templates import SupervisedTemplate

    original = SupervisedTemplate.criterion

    def nan_loss(self: Any) -> torch.Tensor:
        return original(self) * float("nan")

    monkeypatch.setattr(SupervisedTemplate, "criterion", nan_loss)
    with pytest.raises(DivergenceError, match=r"step 1 of \d+, epoch 1, batch 1"):
        cmmm.running.run(config, log=lambda _: None)
    assert not (config.resolved().run_dir() / "results.json").exists()


# --------------------------------------------------------------------------------------------
# Downloads and file modes


def test_download_has_an_overall_deadline_and_cleans_up(tmp_path: Path, monkeypatch) -> None:
    source = tmp_path / "source"
    for entry in MOSI_FILES:
        (source / entry.path).parent.mkdir(parents=True, exist_ok=True)
        (source / entry.path).write_bytes(b"x")
    data_dir = tmp_path / "data"
    stale = data_dir / ".mosi.download-stale"
    stale.mkdir(parents=True)
    os.utime(stale, (0, 0))  # left by a download killed long ago
    monkeypatch.setattr(download, "_DEADLINE_BASE_SECONDS", -1)
    monkeypatch.setattr(download, "_DEADLINE_BYTES_PER_SECOND", 10**15)
    with pytest.raises(DownloadError, match="the most a download of this file may take"):
        download.download_dataset("mosi", data_dir, source=str(source), log=lambda _: None)
    assert list(data_dir.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_honour_the_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "results.json", json.dumps({"a": 1}))
    finally:
        os.umask(previous)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o666 & ~umask
