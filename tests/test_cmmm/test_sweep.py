"""`cmmm sweep`: grids in experiment files, and their runs as tasks on a local two-worker Ray.

The Ray tests share one local Ray (two CPUs) and one cache of pre-trained backbones. The run
functions below are injected into the workers (pickled by value, see ``local_ray``): they wrap
``cmmm.running.run`` and record every call in ``<out>/calls.log``, so a test counts the runs
that really started, in which process, whichever worker ran them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import statistics
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import ray
from ray import cloudpickle
from typer.testing import CliRunner

import cmmm.running
from cmmm.cli import app
from cmmm.errors import ConfigError
from cmmm.experiments import csv_table, load_experiment, markdown_table
from cmmm.sweeping import (
    ERROR_FILE,
    WORKER_LOG,
    plan_sweep,
    ray_session,
    run_sweep,
    worker_runtime_env,
)

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()

# The tiny run settings of conftest's make_tiny_config that a sweep file repeats.
TINY_FIELDS = (
    "stream",
    "epochs",
    "pretrain_epochs",
    "device",
    "stream_options",
    "backbone_options",
)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


def write_sweep(path: Path, tiny_config_at: Any, body: str) -> Path:
    """A sweep file whose [base] is the tiny configuration, then ``body`` (grid, seeds, ...)."""
    tiny = asdict(tiny_config_at(path.parent))
    base = "\n".join(f"{name} = {toml_value(tiny[name])}" for name in TINY_FIELDS)
    path.write_text(f'title = "tiny sweep"\n{body}\n\n[base]\n{base}\n')
    return path


def directories(root: Path, cache: Path) -> dict[str, str]:
    return {"out": str(root), "cache_dir": str(cache), "data_dir": str(root / "data")}


# --- the run functions the workers call instead of cmmm.running.run ---------------------------


def record_call(config: cmmm.running.RunConfig) -> None:
    line = f"{os.getpid()} {config.strategy} {config.seed} {cmmm.running.__file__}\n"
    with open(Path(config.out) / "calls.log", "a") as calls:  # O_APPEND: one line per write
        calls.write(line)


def counted_run(config: cmmm.running.RunConfig, *, log: Any, **kwargs: Any) -> dict:
    record_call(config)
    return cmmm.running.run(config, log=log, **kwargs)


def killed_mid_run_once(config: cmmm.running.RunConfig, *, log: Any, **kwargs: Any) -> dict:
    """ewc's first attempt kills its own worker process after the first task has trained."""
    marker = Path(config.out) / "killed"

    def on_epoch(step: int, epoch: int, loss: float) -> None:
        if config.strategy == "ewc" and step == 1 and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    return counted_run(config, log=log, on_epoch=on_epoch, **kwargs)


def ewc_always_fails(config: cmmm.running.RunConfig, *, log: Any, **kwargs: Any) -> dict:
    if config.strategy == "ewc":
        record_call(config)
        raise RuntimeError("cannot train ewc\nthe last line says why")
    return counted_run(config, log=log)


def calls(root: Path) -> list[tuple[int, str, int, str]]:
    path = root / "calls.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [
        (int(p), strategy, int(seed), source) for p, strategy, seed, source in map(str.split, lines)
    ]


def fingerprints(root: Path) -> dict[Path, tuple[int, int]]:
    """(inode, mtime) of every results.json: a run writes a new file (atomic replace)."""
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.glob("*/results.json")}


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    # The run functions above live in this test module, which the workers cannot import.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        with ray_session(workers=2):
            yield
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pre-trained backbones, built once for every test of this module."""
    return tmp_path_factory.mktemp("sweep-cache")


# --- sweep files ---------------------------------------------------------------------------


def test_grid_crosses_rows_with_every_combination(tmp_path: Path) -> None:
    path = tmp_path / "grid.toml"
    path.write_text(
        """
seeds = [0, 1]
[base]
strategy = "ours"
strategy_options = { prompt_length = 2 }

[grid]
epochs = [1, 2]

[[rows]]
label = "ours"
[rows.grid]
strategy_options.lam = [0.1, 1.0]

[[rows]]
label = "ours lam 0"
strategy_options = { lam = 0.0 }
[rows.grid]
epochs = [3]

[[rows]]
label = "ewc"
strategy = "ewc"
[rows.grid]
"strategy_options.ewc_lambda" = [1.0, 10.0]
"""
    )
    experiment = load_experiment(path, {"out": str(tmp_path)})
    assert [row.label for row in experiment.rows] == [
        "ours epochs=1 lam=0.1",
        "ours epochs=1 lam=1.0",
        "ours epochs=2 lam=0.1",
        "ours epochs=2 lam=1.0",
        "ours lam 0 epochs=3",  # the row's own epochs grid replaces the file's
        "ewc epochs=1 ewc_lambda=1.0",
        "ewc epochs=1 ewc_lambda=10.0",
        "ewc epochs=2 ewc_lambda=1.0",
        "ewc epochs=2 ewc_lambda=10.0",
    ]
    ours = experiment.rows[1].config
    assert (ours.epochs, ours.strategy_options) == (1, {"prompt_length": 2, "lam": 1.0})
    assert experiment.rows[4].config.strategy_options == {"prompt_length": 2, "lam": 0.0}
    # ewc does not inherit ours' prompt_length.
    ewc = experiment.rows[8].config
    assert (ewc.strategy, ewc.epochs, ewc.strategy_options) == ("ewc", 2, {"ewc_lambda": 10.0})
    assert experiment.rows[8].grid_point == {"epochs": 2, "strategy_options.ewc_lambda": 10.0}
    plan = plan_sweep(experiment)  # every strategy option is valid
    assert len(plan.runs) == len(plan.to_run) == 18

    nothing_ran = {row.label: [] for row in experiment.rows}
    assert "Stream `synthetic`, epochs as labelled;" in markdown_table(experiment, nothing_ran)
    header = csv_table(experiment, nothing_ran).splitlines()[0].split(",")
    assert header[:4] == [
        "configuration",
        "epochs",
        "strategy_options.lam",
        "strategy_options.ewc_lambda",
    ]


def test_grid_alone_and_grid_seeds(tmp_path: Path) -> None:
    path = tmp_path / "grid.toml"
    path.write_text('[base]\nepochs = 1\n[grid]\nstrategy = ["naive", "si"]\nseed = [3, 4]\n')
    experiment = load_experiment(path)
    assert [row.label for row in experiment.rows] == ["strategy=naive", "strategy=si"]
    assert experiment.seeds == [3, 4]
    assert [(r.config.strategy, r.seed) for r in experiment.planned_runs()] == [
        ("naive", 3),
        ("naive", 4),
        ("si", 3),
        ("si", 4),
    ]
    path.write_text('[base]\nstrategy = "ewc"\n[grid]\nseed = [0, 1, 2]\n')
    (row,) = load_experiment(path).rows
    assert row.label == "ewc"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("[grid]\nepochz = [1]\n", "'epochz' is unknown"),
        ("[grid]\nepochs = 2\n", "non-empty list"),
        ("[grid]\nepochs = []\n", "non-empty list"),
        ("[grid]\nstrategy_options = [{ lam = 1.0 }]\n", "one option at a time"),
        ("seeds = [0]\n[grid]\nseed = [1]\n", "seeds once"),
        ('[[rows]]\nlabel = "a"\n[rows.grid]\nseed = [1]\n', "seeds are the file's"),
        ("seeds = [0]\n", "[[rows]] table or a [grid]"),
    ],
)
def test_bad_grids_say_what_is_wrong(tmp_path: Path, body: str, fragment: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        load_experiment(path)


def test_a_bad_strategy_option_fails_before_anything_runs(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[base]\nstrategy = "ewc"\n[grid]\nstrategy_options.lamda = [1.0]\n')
    with pytest.raises(ConfigError, match="lamda"):
        plan_sweep(load_experiment(path, {"out": str(tmp_path)}))
    result = runner.invoke(app, ["sweep", str(path), "--out", str(tmp_path), "--dry-run"])
    assert result.exit_code == 2 and "lamda" in result.output and "Traceback" not in result.output


def test_workers_import_this_checkout_and_can_be_sent_it() -> None:
    env = worker_runtime_env(local=True, ship_code=False)
    assert env["env_vars"]["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)
    # A cluster's workers use their own installed cmmm unless the code is shipped.
    assert worker_runtime_env(local=False, ship_code=False) == {}
    shipped = worker_runtime_env(local=False, ship_code=True)["py_modules"]
    assert shipped == [str(REPO / name) for name in ("cmmm", "strategies", "streams")]
    with pytest.raises(ConfigError, match="--workers"):
        with ray_session(address="auto", workers=2):
            pass


def test_ray_is_an_extra_that_the_test_extra_installs() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert [dep for dep in extras["sweep"] if dep.startswith("ray")]
    assert "cmmm[sweep]" in extras["test"]
    assert not [dep for dep in project["dependencies"] if dep.startswith("ray")]


# --- sweeps on a local Ray with two workers --------------------------------------------------


def test_sweep_runs_every_configuration_then_skips_them_all(
    local_ray: None, shared_cache: Path, tmp_path: Path, tiny_config_at: Any
) -> None:
    path = write_sweep(
        tmp_path / "tiny.toml",
        tiny_config_at,
        'seeds = [0, 1]\n[grid]\nstrategy = ["naive", "ewc"]',
    )
    root = tmp_path / "runs"
    experiment = load_experiment(path, directories(root, shared_cache))
    messages: list[str] = []
    report = run_sweep(experiment, root, log=messages.append, run_function=counted_run)

    started = calls(root)
    assert sorted((s, seed) for _, s, seed, _ in started) == [
        ("ewc", 0),
        ("ewc", 1),
        ("naive", 0),
        ("naive", 1),
    ]
    assert len({pid for pid, *_ in started}) == 2  # both workers ran
    assert all(source.startswith(str(REPO)) for *_, source in started)  # this checkout's code
    assert report.count("ran") == 4 and not report.failures
    assert sum(m.startswith("[") and ": done in" in m for m in messages) == 4
    results = sorted(root.glob("*/results.json"))
    assert len(results) == 4
    assert all((p.parent / WORKER_LOG).read_text() for p in results)

    # The tables hold the runs' own numbers.
    assert report.markdown_path == root / "tiny.md" and report.csv_path == root / "tiny.csv"
    assert report.markdown_path.read_text() == report.table
    records = {
        r["configuration"]: r for r in csv.DictReader(io.StringIO(report.csv_path.read_text()))
    }
    assert list(records) == ["strategy=naive", "strategy=ewc"]
    for strategy in ("naive", "ewc"):
        aa = [json.loads(p.read_text())["aa"] for p in results if f"-{strategy}-" in p.parent.name]
        record = records[f"strategy={strategy}"]
        assert record["strategy"] == strategy and record["seeds"] == "0 1"
        assert float(record["aa_mean"]) == pytest.approx(statistics.mean(aa))
        assert f"| strategy={strategy} | {statistics.mean(aa):.2f} ± " in report.table

    # The same sweep again, from the command line: every run is finished, none starts.
    before = fingerprints(root)
    result = runner.invoke(
        app,
        ["sweep", str(path), "--out", str(root), "--cache-dir", str(shared_cache),
         "--data-dir", str(root / "data"), "--no-headroom"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "4 runs: 4 finished already (skipped), none to run" in result.output
    assert "| strategy=ewc |" in result.output
    assert fingerprints(root) == before
    assert len(calls(root)) == 4


def test_existing_results_are_reused_and_the_rest_run(
    local_ray: None, shared_cache: Path, tmp_path: Path, tiny_config_at: Any
) -> None:
    root = tmp_path / "runs"
    # Seed 1 finished earlier, by a plain `cmmm run` of the same configuration.
    earlier = tiny_config_at(tmp_path, strategy="naive", seed=1, cache_dir=str(shared_cache))
    cmmm.running.run(earlier, log=lambda _: None)
    before = fingerprints(root)
    path = write_sweep(tmp_path / "tiny.toml", tiny_config_at, "[grid]\nseed = [0, 1]")
    options = [
        "--out",
        str(root),
        "--cache-dir",
        str(shared_cache),
        "--data-dir",
        str(root / "data"),
        "--no-headroom",  # the zeroshot and joint rows would add runs to count here
    ]

    dry = runner.invoke(app, ["sweep", str(path), *options, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    statuses = {line.split()[-2]: line.split()[0] for line in dry.output.splitlines()[1:]}
    assert statuses == {"0": "to", "1": "finished"}

    result = runner.invoke(app, ["sweep", str(path), *options, "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "2 runs: 1 finished already (skipped), 1 to run" in result.output
    after = fingerprints(root)
    assert len(after) == 2 and all(after[p] == before[p] for p in before)
    assert "| naive | " in result.output and "| 2 |" in result.output  # both seeds in the row


def test_a_worker_killed_mid_run_is_retried_and_the_sweep_completes(
    local_ray: None, shared_cache: Path, tmp_path: Path, tiny_config_at: Any
) -> None:
    path = write_sweep(
        tmp_path / "tiny.toml", tiny_config_at, 'seeds = [0]\n[grid]\nstrategy = ["naive", "ewc"]'
    )
    root = tmp_path / "runs"
    experiment = load_experiment(path, directories(root, shared_cache))
    messages: list[str] = []
    report = run_sweep(
        experiment, root, retries=1, log=messages.append, run_function=killed_mid_run_once
    )

    killed_pid = int((root / "killed").read_text())
    started = calls(root)
    ewc_pids = [pid for pid, strategy, *_ in started if strategy == "ewc"]
    assert len(ewc_pids) == 2 and ewc_pids[0] == killed_pid != ewc_pids[1]
    (retry,) = [m for m in messages if "retrying" in m]
    assert retry.startswith("strategy=ewc seed 0: attempt 1 failed (")
    assert report.count("ran") == 2 and not report.failures
    assert len(list(root.glob("*/results.json"))) == 2
    assert "| strategy=ewc |" in report.table and "failed" not in report.table


def test_an_error_is_retried_then_reported_while_the_others_finish(
    local_ray: None, shared_cache: Path, tmp_path: Path, tiny_config_at: Any
) -> None:
    path = write_sweep(
        tmp_path / "tiny.toml", tiny_config_at, 'seeds = [0]\n[grid]\nstrategy = ["naive", "ewc"]'
    )
    root = tmp_path / "runs"
    experiment = load_experiment(path, directories(root, shared_cache))
    messages: list[str] = []
    report = run_sweep(
        experiment, root, retries=1, log=messages.append, run_function=ewc_always_fails
    )

    assert [s for _, s, *_ in calls(root)].count("ewc") == 2  # the first attempt and one retry
    ((label, failure),) = report.failures
    expected = "RuntimeError: the last line says why (after 2 attempts)"
    assert (label, failure.seed, failure.error) == ("strategy=ewc", 0, expected)
    assert report.count("ran") == 1
    assert "- strategy=ewc seed 0: " + expected in report.table
    # AA, FM, AA valid and the paired difference are n/a for a row with no finished run.
    assert "| strategy=ewc | n/a | n/a | n/a | n/a | - | - | 0 (1 failed) |" in report.table
    error_file = experiment.planned_runs()[1].config.run_dir() / ERROR_FILE
    assert "cannot train ewc" in error_file.read_text()  # the whole error, for debugging
    assert not (error_file.parent / "results.json").exists()
    assert len(list(root.glob("*/results.json"))) == 1
    assert any("FAILED after 2 attempts" in m for m in messages)


def test_cpus_per_run_beyond_any_node_is_refused(
    local_ray: None, shared_cache: Path, tmp_path: Path, tiny_config_at: Any
) -> None:
    path = write_sweep(tmp_path / "tiny.toml", tiny_config_at, "seeds = [0]\n[grid]\nepochs = [1]")
    experiment = load_experiment(path, directories(tmp_path / "runs", shared_cache))
    with pytest.raises(ConfigError, match="--cpus-per-run 3 is more than any node has"):
        run_sweep(experiment, tmp_path, cpus_per_run=3, log=lambda _: None)
    assert ray.is_initialized()
