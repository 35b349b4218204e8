"""Checkpoints and resume: an interrupted run, resumed, writes the results of an uninterrupted one.

Every resume test compares the whole ``results.json`` with an uninterrupted run of the same
configuration, except the two timings (``TIMING_KEYS``). The runs share one warm pre-training
cache so that the pre-training record is the same, and the uninterrupted run's directory is moved
aside before the interrupted run uses the same directory, so that paths are the same too.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

import cmmm.running
from cmmm.atomic_files import atomic_write, atomic_write_text
from cmmm.checkpoints import CHECKPOINT_FILE, read_checkpoint
from cmmm.cli import app
from cmmm.errors import CheckpointError
from cmmm.running import RunConfig, RunStopped, prepare, run
from cmmm.template_state import capture_template_state

REPO = Path(__file__).resolve().parents[2]
# The only results that may differ between two runs of one configuration: how long they took.
TIMING_KEYS = ("wall_time_seconds", "train_time_seconds")
# `ours` on the one-layer tiny backbone: every prompt type on layer 0.
OURS_ON_LAYER_0 = {"layers_m": [0], "layers_ta": [0], "layers_ts": [0]}
runner = CliRunner()


def quiet(_: str) -> None:
    pass


def comparable(results: dict[str, Any]) -> str:
    """The results without timings, as canonical JSON (NaN compares equal to itself as text)."""
    return json.dumps({k: v for k, v in results.items() if k not in TIMING_KEYS}, sort_keys=True)


def perturb_global_rngs() -> None:
    """What a new process would bring: other states of every generator the run uses."""
    random.seed(12345)
    np.random.seed(12345)
    torch.manual_seed(12345)
    random.random()
    np.random.rand(3)
    torch.rand(3)


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


class References:
    """Uninterrupted runs on a warm pre-training cache, each made once per test module."""

    def __init__(self, root: Path, make_config: Callable[..., RunConfig]) -> None:
        self.root = root
        self.make_config = make_config
        self.done: dict[tuple[str, str], tuple[dict[str, Any], Path]] = {}
        for stream in ("synthetic", "synthetic-cls"):
            prepare(self.config("naive", stream).resolved(), quiet)  # pre-trains into the cache

    def config(self, strategy: str, stream: str = "synthetic") -> RunConfig:
        options = OURS_ON_LAYER_0 if strategy == "ours" else {}
        return self.make_config(
            self.root, strategy=strategy, stream=stream, strategy_options=options
        )

    def results(self, strategy: str, stream: str = "synthetic") -> tuple[dict[str, Any], Path]:
        """The uninterrupted run's results, and where its directory was moved to."""
        if (strategy, stream) not in self.done:
            results = run(self.config(strategy, stream), log=quiet)
            assert (Path(results["run_dir"]) / CHECKPOINT_FILE).is_file()
            moved = self.root / "uninterrupted" / Path(results["run_dir"]).name
            moved.parent.mkdir(exist_ok=True)
            shutil.move(results["run_dir"], moved)
            self.done[strategy, stream] = (results, moved)
        return self.done[strategy, stream]


@pytest.fixture(scope="module")
def references(tmp_path_factory, tiny_config_at) -> References:
    return References(tmp_path_factory.mktemp("resume"), tiny_config_at)


# --------------------------------------------------------------------------------------------
# Interrupted after the third experience, resumed: the same results.json
# --------------------------------------------------------------------------------------------

# Every kind of state a strategy keeps between experiences.
RESUMED = [
    ("naive", "synthetic"),  # model, Adam moments kept across experiences, Avalanche's clock
    ("ewc", "synthetic"),  # Fisher importances and anchors per experience
    ("si", "synthetic"),  # path integrals and importances
    ("lwf", "synthetic"),  # the previous model
    ("er-250", "synthetic"),  # an experience-balanced reservoir buffer
    ("der-250", "synthetic"),  # a reservoir buffer with stored outputs
    ("der-500", "synthetic-cls"),  # class-balanced buffers with stored logits
    ("agem-250", "synthetic"),  # per-experience memories and their loader
    ("icarl-250", "synthetic"),  # herding exemplars and the previous model
    ("icarl-500", "synthetic-cls"),  # + the nearest-mean classifier's class means
    ("l2p", "synthetic"),  # a prompt pool with keys; a new optimizer per experience
    ("ours", "synthetic"),  # per-pattern prompts, the contrastive plugin
]


@pytest.mark.parametrize(("strategy", "stream"), RESUMED, ids=[f"{s}-{t}" for s, t in RESUMED])
def test_resumed_run_equals_uninterrupted_run(references, strategy: str, stream: str) -> None:
    expected, _ = references.results(strategy, stream)
    config = references.config(strategy, stream)
    run_dir = config.resolved().run_dir()
    with pytest.raises(RunStopped) as stopped:
        run(config, log=quiet, stop_after=3)
    assert stopped.value.completed_steps == 3
    assert not (run_dir / "results.json").exists()
    assert read_checkpoint(run_dir / CHECKPOINT_FILE).completed_steps == 3

    perturb_global_rngs()
    resumed = run(references.config(strategy, stream), log=quiet, resume=True)

    assert comparable(resumed) == comparable(expected)
    assert json.loads((run_dir / "results.json").read_text()) == json.loads(json.dumps(resumed))
    assert read_checkpoint(run_dir / CHECKPOINT_FILE).finished
    shutil.rmtree(run_dir)


def test_resume_restores_the_random_generators(references, monkeypatch) -> None:
    """The comparison above is sharp: without the generators' state the results differ."""
    expected, _ = references.results("naive")
    config = references.config("naive")
    with pytest.raises(RunStopped):
        run(config, log=quiet, stop_after=3)
    monkeypatch.setattr(cmmm.running, "restore_rng", lambda state: None)
    resumed = run(config, log=quiet, resume=True)
    assert comparable(resumed) != comparable(expected)
    shutil.rmtree(resumed["run_dir"])


def test_crash_mid_step_rewinds_tensorboard(references) -> None:
    """An exception in the middle of step 5: the resumed run's TensorBoard events are those of
    the uninterrupted run, without the crashed session's events after the checkpoint."""
    expected, reference_dir = references.results("naive")
    config = references.config("naive")

    def crash(step: int, epoch: int, loss: float) -> None:
        if step == 4:  # step 5's first epoch is logged to TensorBoard, then the crash
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        run(config, log=quiet, on_epoch=crash)
    run_dir = config.resolved().run_dir()
    assert read_checkpoint(run_dir / CHECKPOINT_FILE).completed_steps == 4
    assert "train_loss/step4" in scalars(run_dir)

    resumed = run(config, log=quiet, resume=True)
    assert comparable(resumed) == comparable(expected)
    assert scalars(run_dir) == scalars(reference_dir)
    shutil.rmtree(run_dir)


def test_sigkill_while_writing_a_checkpoint_then_resume_from_the_command_line(
    references,
) -> None:
    """A process killed (SIGKILL) while writing its 5th checkpoint keeps the 4th; `cmmm run
    --resume` in a new process finishes the run exactly; stray files and events are cleaned."""
    expected, reference_dir = references.results("naive")
    config = references.config("naive").resolved()
    run_dir = config.run_dir()
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(REPO), json.dumps(asdict(config)), "5"],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert list(run_dir.glob(f".{CHECKPOINT_FILE}.*.tmp")), "the partial write should be there"
    assert read_checkpoint(run_dir / CHECKPOINT_FILE).completed_steps == 4

    resumed = subprocess.run(
        [sys.executable, "-c", CLI, str(REPO), "run", "--resume", str(run_dir)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after step 4 of 7" in resumed.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert comparable(results) == comparable(json.loads(json.dumps(expected)))
    assert not list(run_dir.glob(".*.tmp"))
    assert scalars(run_dir) == scalars(reference_dir)
    shutil.rmtree(run_dir)


# Runs a configuration and SIGKILLs itself halfway through writing checkpoint number argv[3].
KILLED_RUN = """
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
import cmmm.checkpoints
from cmmm.running import RunConfig, run

real_atomic_write, calls = cmmm.checkpoints.atomic_write, []

def dying_write(path, write):
    calls.append(path)
    if len(calls) < int(sys.argv[3]):
        return real_atomic_write(path, write)
    def half(handle):
        handle.write(b"PK half a checkpoint")
        handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real_atomic_write(path, half)

cmmm.checkpoints.atomic_write = dying_write
run(RunConfig(**json.loads(sys.argv[2])), log=lambda message: None)
"""
# The command line of this checkout, in a new process.
CLI = """
import sys
sys.path.insert(0, sys.argv.pop(1))
import torch
torch.set_num_threads(1)
from cmmm.cli import app
app()
"""


# --------------------------------------------------------------------------------------------
# Nothing half-written
# --------------------------------------------------------------------------------------------


def test_atomic_write_keeps_the_previous_file_when_writing_fails(tmp_path) -> None:
    target = tmp_path / "file.json"
    atomic_write_text(target, "old")

    def fails_halfway(handle) -> None:
        handle.write(b"new, but only ha")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fails_halfway)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.json"]


def test_failed_checkpoint_replace_keeps_the_previous_checkpoint(references, monkeypatch) -> None:
    config = references.config("naive")
    run_dir = config.resolved().run_dir()
    with pytest.raises(RunStopped):
        run(config, log=quiet, stop_after=2)
    previous = (run_dir / CHECKPOINT_FILE).read_bytes()

    def no_replace(source, target) -> None:
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", no_replace)
    with pytest.raises(OSError, match="simulated crash"):
        run(config, log=quiet, resume=True)
    monkeypatch.undo()
    assert (run_dir / CHECKPOINT_FILE).read_bytes() == previous
    assert read_checkpoint(run_dir / CHECKPOINT_FILE).completed_steps == 2
    assert not list(run_dir.glob(".*.tmp"))
    shutil.rmtree(run_dir)


# --------------------------------------------------------------------------------------------
# Refusals and errors
# --------------------------------------------------------------------------------------------


@pytest.fixture
def stopped_run(references) -> Iterator[Path]:
    """A naive run stopped after its first step; its directory is removed afterwards."""
    references.results("naive")  # made first: it uses the same run directory, then moves it
    config = references.config("naive")
    with pytest.raises(RunStopped):
        run(config, log=quiet, stop_after=1)
    run_dir = config.resolved().run_dir()
    yield run_dir
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # truncated
        lambda data: b"garbage" * 100,  # not a checkpoint at all
        lambda data: b"",  # empty
    ],
    ids=["truncated", "garbage", "empty"],
)
def test_damaged_checkpoint_is_a_checkpoint_error_naming_the_file(
    references, stopped_run, damage
) -> None:
    path = stopped_run / CHECKPOINT_FILE
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match="not a readable cmmm checkpoint") as info:
        run(references.config("naive"), log=quiet, resume=True)
    assert str(path) in str(info.value)
    result = runner.invoke(app, ["run", "--resume", str(stopped_run)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert str(path) in result.output.replace("\n", "")


def test_checkpoint_of_another_configuration_is_refused(references, stopped_run) -> None:
    other = references.config("naive")
    other.lr = 5e-4
    other_dir = other.resolved().run_dir()
    other_dir.mkdir(parents=True)
    shutil.copy(stopped_run / CHECKPOINT_FILE, other_dir / CHECKPOINT_FILE)
    try:
        with pytest.raises(CheckpointError, match="belongs to another configuration") as info:
            run(other, log=quiet, resume=True)
        assert "different: lr" in str(info.value)
        assert str(other_dir / CHECKPOINT_FILE) in str(info.value)
        # From the command line the configuration comes from the checkpoint, which then does
        # not belong in that directory.
        result = runner.invoke(app, ["run", "--resume", str(other_dir)])
        assert result.exit_code == 2 and "rename the directory back" in result.output
    finally:
        shutil.rmtree(other_dir)


def test_new_run_over_an_unfinished_one_is_refused(references, stopped_run) -> None:
    before = (stopped_run / CHECKPOINT_FILE).read_bytes()
    with pytest.raises(CheckpointError, match="cmmm run --resume"):
        run(references.config("naive"), log=quiet)
    assert (stopped_run / CHECKPOINT_FILE).read_bytes() == before


def test_resume_without_checkpoint(references, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        run(references.config("naive"), log=quiet, resume=True)
    empty = tmp_path / "synthetic-naive-seed0-0000000000"
    empty.mkdir()
    result = runner.invoke(app, ["run", "--resume", str(empty)])
    assert result.exit_code == 2
    assert "start the run with `cmmm run`" in result.output
    result = runner.invoke(app, ["run", "--resume", str(tmp_path / "absent")])
    assert result.exit_code == 2 and "no such run directory" in result.output


def test_resume_takes_no_other_settings(stopped_run) -> None:
    result = runner.invoke(app, ["run", "--resume", str(stopped_run), "--seed", "0", "-o", "x=1"])
    assert result.exit_code == 2
    assert "--seed, --option cannot be given with it" in result.output


def test_cli_resume_finishes_the_run_then_says_it_is_finished(references, stopped_run) -> None:
    expected, _ = references.results("naive")
    result = runner.invoke(app, ["run", "--resume", str(stopped_run)])
    assert result.exit_code == 0, result.output
    results = json.loads((stopped_run / "results.json").read_text())
    assert comparable(results) == comparable(json.loads(json.dumps(expected)))
    again = runner.invoke(app, ["run", "--resume", str(stopped_run)])
    assert again.exit_code == 0
    assert "the run is finished" in again.output


def test_a_plugin_without_checkpoint_support_is_refused() -> None:
    class Unknown:
        counter = 0

    model = torch.nn.Linear(2, 1)
    template = SimpleNamespace(
        model=model,
        optimizer=torch.optim.Adam(model.parameters()),
        plugins=[Unknown()],
        device="cpu",
    )
    with pytest.raises(CheckpointError, match="cannot checkpoint the plugin .*Unknown"):
        capture_template_state(template, samples=None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["er-250", "l2p"])
def test_same_seed_twice_gives_the_same_results(references, strategy: str) -> None:
    """Beside tests/test_cmmm/test_running.py's naive check: a replay method and a prompt method."""
    expected, _ = references.results(strategy)
    perturb_global_rngs()
    again = run(references.config(strategy), log=quiet)
    assert comparable(again) == comparable(expected)
    shutil.rmtree(again["run_dir"])


def test_a_checkpoint_of_another_strategy_version_says_where_and_what_to_do(monkeypatch) -> None:
    """A checkpoint whose plugins are not the strategy's (written by an older version) names the
    checkpoint and says to delete the run directory, the only way such a run can start over."""

    def mismatch(*args: Any) -> None:
        raise CheckpointError("the checkpoint's plugins ['A'] are not this strategy's ['B']")

    monkeypatch.setattr(cmmm.running, "restore_template_state", mismatch)
    path = Path("runs/x/checkpoint.pt")
    checkpoint = SimpleNamespace(template={}, evaluator={})
    with pytest.raises(CheckpointError) as info:
        cmmm.running.restore_checkpoint(path, None, checkpoint, None, None, None)  # type: ignore[arg-type]
    message = str(info.value)
    assert message.startswith(f"{path}: the checkpoint's plugins")
    assert "delete the run directory" in message and "\n" not in message
