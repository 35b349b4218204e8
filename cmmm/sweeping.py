"""``cmmm sweep``: an experiment file's runs as Ray tasks, on a local Ray or an existing cluster.

The runs are exactly those of ``cmmm experiment`` (``cmmm.experiments``: rows, a ``[grid]``,
seeds) and so is the table at the end; only the executor differs. Every run is one Ray task with
``cpus_per_run`` CPUs that calls ``cmmm.running.run`` and writes its own
``OUT/<stream>-<strategy>-seed<seed>-<key>/``. A run whose ``results.json`` exists is skipped (the
key is a hash of the resolved configuration, so the same configuration finds the same
directory): a sweep can be stopped at any point and started again. A run that fails (its worker
died, or the run raised) is submitted again up to ``retries`` times, then reported; the others
go on.

Workers import ``cmmm`` themselves. On a local Ray started from a source checkout, the checkout
is put on the workers' ``PYTHONPATH`` so that they import the same code as the driver; on a
cluster the workers use the ``cmmm`` installed on their nodes, unless ``ship_code`` uploads this
checkout's packages with the job (Ray's ``runtime_env`` ``py_modules``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

from cmmm import running
from cmmm.atomic_files import atomic_write_text
from cmmm.errors import ConfigError, DataError
from cmmm.experiments import Experiment, PlannedRun, write_tables
from cmmm.outcomes import RunOutcome, read_results
from cmmm.results import Results
from cmmm.run_config import RunConfig

# ``cmmm.running.run``'s signature: ``(config, log=...) -> results``.
RunFunction = Callable[..., dict[str, Any]]

# Written by the worker into each run directory: what the run logged (which node, pre-training,
# ...). A failed run's full error goes next to it, written by the driver.
WORKER_LOG = "sweep.log"
ERROR_FILE = "sweep-error.txt"


def import_ray() -> ModuleType:
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "Ray is not installed; install it with pip install 'cmmm[sweep]' (or pip install ray)"
        ) from None
    return ray


def _package_dirs() -> list[Path]:
    """The directories of the three packages a worker imports, as this process imported them."""
    import cmmm
    from cmmm.discovery import plugin_package_dirs

    return [Path(cmmm.__file__).resolve().parent, *plugin_package_dirs()]


def source_checkout() -> Path | None:
    """The repository root when ``cmmm`` is imported from a source checkout, else None."""
    root = _package_dirs()[0].parent
    return root if (root / "pyproject.toml").is_file() else None


def worker_runtime_env(local: bool, ship_code: bool) -> dict[str, Any]:
    """Ray's ``runtime_env`` that makes workers import the code this driver runs.

    ``ship_code``: upload the three packages with the job (works anywhere, costs an upload).
    A local Ray from a source checkout: the checkout on the workers' ``PYTHONPATH`` (they run on
    this machine). Otherwise nothing: cluster nodes use their installed ``cmmm``.
    """
    if ship_code:
        return {"py_modules": [str(path) for path in _package_dirs()]}
    checkout = source_checkout()
    if local and checkout is not None:
        inherited = os.environ.get("PYTHONPATH")
        paths = [str(checkout), *([inherited] if inherited else [])]
        return {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}}
    return {}


def check_reachable(address: str) -> None:
    """Fail in seconds when nothing listens at ``host:port`` (Ray itself waits for minutes)."""
    host, separator, port = address.split("://")[-1].rpartition(":")
    if not separator or not port.isdigit():  # "auto" and other forms Ray resolves itself
        return
    try:
        with socket.create_connection((host, int(port)), timeout=10):
            pass
    except OSError as error:
        raise ConfigError(
            f"--address {address}: nothing answers there ({error}); start the cluster with "
            "`ray start --head` and pass the address it prints"
        ) from None


@contextlib.contextmanager
def ray_session(
    address: str | None = None, workers: int | None = None, ship_code: bool = False
) -> Iterator[None]:
    """Connect to the cluster at ``address``, or start a local Ray with ``workers`` CPUs.

    Ray is shut down on exit. If this process already initialised Ray (a test, a notebook), that
    Ray is used as it is and left running; ``address``, ``workers`` and ``ship_code`` are then
    ignored.
    """
    if address is not None and workers is not None:
        raise ConfigError(
            "--workers sets the CPUs of a local Ray; with --address the cluster's nodes decide"
        )
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    ray = import_ray()
    if ray.is_initialized():
        yield
        return
    options: dict[str, Any] = {
        "runtime_env": worker_runtime_env(local=address is None, ship_code=ship_code),
        # Progress and failures are reported by the sweep; each run's own log is in its
        # directory. Ray's worker output and notices would interleave with them.
        "logging_level": logging.ERROR,
        "log_to_driver": False,
    }
    if address is None:
        # "local": a new Ray on this machine even when RAY_ADDRESS names another one. Without
        # --workers, Ray counts the CPUs itself (respecting a container's CPU limit).
        options.update(address="local", include_dashboard=False)
        if workers is not None:
            options["num_cpus"] = workers
    else:
        check_reachable(address)
        options["address"] = address
    where = "a local Ray" if address is None else f"the Ray cluster at {address}"
    try:
        ray.init(**options)
    except Exception as error:  # noqa: BLE001 - ConnectionError, RuntimeError, ValueError, ...
        hint = (
            "start one with `ray start --head` and pass the address it prints"
            if address is not None
            else "Ray's own logs are under /tmp/ray/session_latest/logs"
        )
        raise ConfigError(
            f"cannot start or reach {where} ({describe_error(error)}); {hint}"
        ) from None
    try:
        yield
    finally:
        ray.shutdown()


def cluster_cpus() -> tuple[float, float, int]:
    """(CPUs in the cluster, CPUs of its largest node, number of nodes) of the connected Ray."""
    ray = import_ray()
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    per_node = [float(node.get("Resources", {}).get("CPU", 0.0)) for node in nodes]
    return sum(per_node), max(per_node, default=0.0), len(nodes)


def check_workers_can_run() -> None:
    """Fail once, clearly, when the cluster's workers cannot import this sweep's code.

    Otherwise every run would fail (and be retried) with the same import error. One worker on
    one node is asked; nodes set up differently are still reported run by run.
    """
    ray = import_ray()

    # Defined here so that it is pickled by value: the workers need not import cmmm to run it.
    def import_error() -> str | None:
        import importlib

        try:
            importlib.import_module(__name__)
        except ImportError as error:
            return f"{type(error).__name__}: {error}"
        return None

    probe = ray.remote(num_cpus=0, max_retries=0)(import_error)
    error = ray.get(probe.remote())
    if error is not None:
        raise ConfigError(
            f"the Ray workers cannot import {__name__} ({error}); install this cmmm (with its "
            "sweep extra) on every node, or pass --ship-code to send this checkout's code"
        )


def describe_error(error: BaseException) -> str:
    """``Type: last line of the message`` of what a run raised (unwrapping Ray's task error)."""
    cause = getattr(error, "cause", None)  # RayTaskError: the exception the run itself raised
    if isinstance(cause, BaseException):
        error = cause
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1]}" if lines else type(error).__name__


def execute_run(run_function: RunFunction, config: RunConfig, threads: int) -> dict[str, Any]:
    """The Ray task: one run with ``threads`` torch threads, its log in its own directory."""
    import torch

    # PyTorch would start one thread per core of the node and fight the other runs for them.
    torch.set_num_threads(threads)
    run_dir = config.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / WORKER_LOG, "a") as log_file:

        def log(message: str) -> None:
            log_file.write(message + "\n")
            log_file.flush()

        log(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()} pid {os.getpid()}")
        from cmmm.checkpoints import CHECKPOINT_FILE

        # An attempt that died (a killed worker, a preempted node) left its last checkpoint:
        # the retry continues from it instead of being refused as an unfinished run.
        if (run_dir / CHECKPOINT_FILE).exists():
            log("resuming from the last checkpoint")
            return run_function(config, log=log, resume=True)
        return run_function(config, log=log)


def _with_absolute_paths(config: RunConfig) -> RunConfig:
    """Workers do not share the driver's working directory (on a cluster, not even its disk)."""
    return replace(
        config,
        out=os.path.abspath(config.out),
        data_dir=os.path.abspath(config.data_dir),
        cache_dir=os.path.abspath(config.cache_dir),
    )


@dataclass(frozen=True)
class SweepPlan:
    """Every (row, seed) of an experiment, and which of them have results already."""

    runs: list[PlannedRun]
    # run directory -> its results, for the runs that finished before.
    finished: dict[Path, Results]

    @property
    def to_run(self) -> list[PlannedRun]:
        """The runs without results, once each (two rows may resolve to the same run)."""
        unique: dict[Path, PlannedRun] = {}
        for run in self.runs:
            if run.config.run_dir() not in self.finished:
                unique.setdefault(run.config.run_dir(), run)
        return list(unique.values())


def plan_sweep(experiment: Experiment) -> SweepPlan:
    # Planning resolves every run: an unknown strategy or option fails now, not in a worker
    # after Ray has started.
    runs = [
        replace(run, config=_with_absolute_paths(run.config)) for run in experiment.planned_runs()
    ]
    finished = {}
    for run in runs:
        result = read_results(run.config.run_dir() / "results.json")
        if result is not None:
            finished[run.config.run_dir()] = result
    return SweepPlan(runs, finished)


@dataclass
class SweepReport:
    plan: SweepPlan
    # Row label -> one outcome per seed, as ``cmmm.experiments``' tables take them.
    outcomes: dict[str, list[RunOutcome]]
    table: str
    markdown_path: Path
    csv_path: Path

    def count(self, status: str) -> int:
        return sum(o.status == status for runs in self.outcomes.values() for o in runs)

    @property
    def failures(self) -> list[tuple[str, RunOutcome]]:
        return [
            (label, outcome)
            for label, runs in self.outcomes.items()
            for outcome in runs
            if outcome.status == "failed"
        ]


def run_sweep(
    experiment: Experiment,
    out: Path,
    cpus_per_run: int = 1,
    retries: int = 1,
    log: Callable[[str], None] = print,
    run_function: RunFunction | None = None,
) -> SweepReport:
    """Run every missing (row, seed) of ``experiment`` on the connected Ray; write the tables.

    ``run_function`` replaces ``cmmm.running.run`` (tests inject failures with it); it must be
    importable by the workers or pickled by value.
    """
    if cpus_per_run < 1:
        raise ConfigError(f"--cpus-per-run must be >= 1, got {cpus_per_run}")
    if retries < 0:
        raise ConfigError(f"--retries must be >= 0, got {retries}")
    plan = plan_sweep(experiment)
    to_run = plan.to_run
    skipped = f"{len(plan.runs)} runs: {len(plan.runs) - len(to_run)} finished already (skipped)"
    if not to_run:
        log(f"{skipped}, none to run")
        return _report(experiment, out, plan, dict(plan.finished), {})
    ray = import_ray()
    if not ray.is_initialized():
        raise ConfigError("Ray is not running; call run_sweep inside ray_session()")
    total_cpus, largest_node, nodes = cluster_cpus()
    if cpus_per_run > largest_node:
        raise ConfigError(
            f"--cpus-per-run {cpus_per_run} is more than any node has (largest: "
            f"{largest_node:g} CPUs); lower it or add a bigger node"
        )
    log(
        f"{skipped}, {len(to_run)} to run on {nodes} node(s) with {total_cpus:g} CPUs, "
        f"{cpus_per_run} CPU(s) per run"
    )
    check_workers_can_run()
    task = ray.remote(execute_run).options(num_cpus=cpus_per_run, max_retries=0)
    function = run_function or running.run
    # ref -> (run, attempt); retried here rather than by Ray so that every retry is reported.
    pending: dict[Any, tuple[PlannedRun, int]] = {}
    results: dict[Path, Results] = dict(plan.finished)
    errors: dict[Path, str] = {}

    def submit(run: PlannedRun, attempt: int) -> None:
        pending[task.remote(function, run.config, cpus_per_run)] = (run, attempt)

    for run in to_run:
        submit(run, 1)
    done, started = 0, time.perf_counter()
    try:
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            run, attempt = pending.pop(ref)
            name = f"{run.label} seed {run.seed}"
            run_dir = run.config.run_dir()
            try:
                record = ray.get(ref)
            except ray.exceptions.RayError as error:
                message = describe_error(error)
                if attempt <= retries:
                    log(f"{name}: attempt {attempt} failed ({message}); retrying")
                    submit(run, attempt + 1)
                    continue
                done += 1
                errors[run_dir] = f"{message} (after {attempt} attempts)"
                atomic_write_text(run_dir / ERROR_FILE, f"{name}\n{run.config}\n\n{error}\n")
                log(f"[{done}/{len(to_run)}] {name}: FAILED after {attempt} attempts ({message})")
                continue
            done += 1
            results_path = run_dir / "results.json"
            try:
                result = Results.from_json(record, results_path)
            except DataError as error:  # a run function that returned something else
                errors[run_dir] = str(error)
                log(f"[{done}/{len(to_run)}] {name}: FAILED ({error})")
                continue
            results[run_dir] = result
            if not results_path.exists():  # run on a node that does not share this disk
                atomic_write_text(results_path, json.dumps(record, indent=2))
            (run_dir / ERROR_FILE).unlink(missing_ok=True)  # from an earlier, failed sweep
            aa = result.aa
            log(
                f"[{done}/{len(to_run)}] {name}: done in {result.wall_time_seconds:.1f} s"
                + ("" if aa is None else f", AA {aa:.2f}")
                + f" ({time.perf_counter() - started:.0f} s into the sweep)"
            )
    except BaseException:
        # Ctrl-C or a lost connection: stop the runs still going; a restart reruns only them.
        for ref in pending:
            ray.cancel(ref, force=True)
        raise

    return _report(experiment, out, plan, results, errors)


def _report(
    experiment: Experiment,
    out: Path,
    plan: SweepPlan,
    results: dict[Path, Results],
    errors: dict[Path, str],
) -> SweepReport:
    """Every planned run's outcome (reused, ran or failed) and the tables written from them."""
    outcomes: dict[str, list[RunOutcome]] = {row.label: [] for row in experiment.rows}
    for run in plan.runs:
        run_dir = run.config.run_dir()
        path = run_dir / "results.json"
        strategy = run.config.strategy
        if run_dir in plan.finished:
            outcome = RunOutcome(strategy, run.seed, "reused", path, results[run_dir])
        elif run_dir in results:
            outcome = RunOutcome(strategy, run.seed, "ran", path, results[run_dir])
        else:
            outcome = RunOutcome(strategy, run.seed, "failed", path, None, errors[run_dir])
        outcomes[run.label].append(outcome)
    table, markdown_path, csv_path = write_tables(experiment, outcomes, out, "cmmm sweep")
    return SweepReport(plan, outcomes, table, markdown_path, csv_path)
