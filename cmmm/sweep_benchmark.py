"""How fast does a sweep go on Ray, and what does Ray cost per run?

The same N runs (one configuration, seeds 0..N-1) are made three ways, each into its own fresh
directory so that nothing is skipped: one after another in this process, then as a sweep on a
local Ray with 1 worker, then with 2 (or the worker counts asked for). Every way runs with one
torch thread per run, and every pre-trained backbone is built before any timing starts, so all
ways do the same work. Ray's overhead per run is (Ray with 1 worker - one process) / N, once with
Ray's start-up included (what a user waits for) and once without.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.table import Table

from cmmm import running
from cmmm.config import resolve
from cmmm.errors import ConfigError
from cmmm.experiments import Experiment, ExperimentRow
from cmmm.run_config import RunConfig
from cmmm.sweeping import import_ray, ray_session, run_sweep


@dataclass(frozen=True)
class SweepTiming:
    name: str
    workers: int | None  # None: one after another in this process
    runs: int
    startup_seconds: float  # starting Ray (0 in this process)
    run_seconds: float  # from the first run's submission to the last result
    # The machine's 1-minute load average when the mode ended: other work on the machine slows
    # one mode and not another, and this says when that happened.
    load_average: float

    @property
    def total_seconds(self) -> float:
        return self.startup_seconds + self.run_seconds

    @property
    def runs_per_minute(self) -> float:
        return 60.0 * self.runs / self.total_seconds


@dataclass(frozen=True)
class SweepBenchmarkReport:
    description: str
    runs: int
    sequential: SweepTiming
    on_ray: list[SweepTiming]

    def overhead_per_run(self, include_startup: bool) -> float | None:
        """(Ray with 1 worker - one process) / N, in seconds; None without a 1-worker timing."""
        single = next((t for t in self.on_ray if t.workers == 1), None)
        if single is None:
            return None
        ray_seconds = single.total_seconds if include_startup else single.run_seconds
        return (ray_seconds - self.sequential.total_seconds) / self.runs

    def table(self) -> Table:
        with_startup = self.overhead_per_run(include_startup=True)
        without_startup = self.overhead_per_run(include_startup=False)
        caption = (
            "Ray's overhead per run, (Ray 1 worker - one process) / N: "
            f"{with_startup:+.2f} s with Ray's start-up, {without_startup:+.2f} s without"
            if with_startup is not None and without_startup is not None
            else "no 1-worker timing, so no overhead per run"
        )
        table = Table(title=f"sweep throughput: {self.description}", caption=caption)
        columns = ("mode", "Ray start-up (s)", "runs (s)", "total (s)", "runs/min", "speed-up")
        for column in (*columns, "load average"):
            table.add_column(column, justify="left" if column == "mode" else "right")
        for timing in (self.sequential, *self.on_ray):
            table.add_row(
                timing.name,
                "-" if timing.workers is None else f"{timing.startup_seconds:.1f}",
                f"{timing.run_seconds:.1f}",
                f"{timing.total_seconds:.1f}",
                f"{timing.runs_per_minute:.2f}",
                f"{self.sequential.total_seconds / timing.total_seconds:.2f}x",
                f"{timing.load_average:.1f}",
            )
        return table


def measure_sweep_throughput(
    base: RunConfig,
    runs: int,
    out: Path,
    worker_counts: Sequence[int] = (1, 2),
    log: Callable[[str], None] = print,
) -> SweepBenchmarkReport:
    """Time ``runs`` runs of ``base`` (seeds 0..runs-1) in this process and on Ray."""
    if runs < 1:
        raise ConfigError(f"--runs must be >= 1, got {runs}")
    if not worker_counts or any(w < 1 for w in worker_counts):
        raise ConfigError(f"--workers must list positive worker counts, got {list(worker_counts)}")
    if import_ray().is_initialized():
        raise ConfigError("the sweep benchmark starts its own Ray; this process already has one")
    configs = [resolve(replace(base, seed=seed)).config for seed in range(runs)]

    log(f"building the {runs} pre-trained backbones first (not timed)")
    for config in configs:
        running.prepare(config, log=lambda _: None)

    log(f"one process: {runs} runs one after another")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray task does with --cpus-per-run 1
    try:
        tick = time.perf_counter()
        for config in configs:
            running.run(replace(config, out=str(out / "sequential")), log=lambda _: None)
        elapsed = time.perf_counter() - tick
        sequential = SweepTiming("one process", None, runs, 0.0, elapsed, os.getloadavg()[0])
    finally:
        torch.set_num_threads(threads)

    on_ray = []
    for workers in worker_counts:
        directory = out / f"ray-{workers}-workers"
        row = ExperimentRow("benchmark", replace(base, out=str(directory)))
        experiment = Experiment("sweep benchmark", list(range(runs)), [row], Path("benchmark"))
        log(f"Ray with {workers} worker(s): {runs} runs")
        tick = time.perf_counter()
        with ray_session(workers=workers):
            startup = time.perf_counter() - tick
            tick = time.perf_counter()
            report = run_sweep(experiment, directory, log=lambda _: None)
            elapsed = time.perf_counter() - tick
        if report.count("ran") != runs:
            failed = "; ".join(f"seed {o.seed}: {o.error}" for _, o in report.failures)
            raise ConfigError(f"the benchmark's runs on Ray did not all finish: {failed}")
        name = f"Ray, {workers} worker" + ("s" if workers > 1 else "")
        on_ray.append(SweepTiming(name, workers, runs, startup, elapsed, os.getloadavg()[0]))
    first = configs[0]
    description = (
        f"{runs} runs of {first.strategy} on {first.stream}, {first.epochs} epoch(s) per task, "
        "1 CPU per run"
    )
    return SweepBenchmarkReport(description, runs, sequential, on_ray)
