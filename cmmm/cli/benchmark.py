"""`cmmm benchmark`: speed, overhead, sweep and modality-count benchmarks."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cmmm.cli.common import (
    CacheDirOption,
    DataDirOption,
    DeviceOption,
    console,
    reports_errors,
    with_directories,
)
from cmmm.errors import ConfigError


@reports_errors
def benchmark_speed(
    rounds: Annotated[int, typer.Option(help="alternated rounds (min and median over them)")] = 5,
    steps: Annotated[int, typer.Option(help="training steps timed per round and side")] = 20,
    threads: Annotated[int, typer.Option(help="intra-op CPU threads")] = 1,
) -> None:
    """Training step and evaluation pass of the stacked MulT against the reference, on MOSI
    shapes, for naive and ours."""
    from cmmm.speed_benchmark import measure_speed

    report = measure_speed(rounds=rounds, steps=steps, threads=threads)
    Console(soft_wrap=True, markup=False).print(report.markdown())


@reports_errors
def benchmark_overhead(
    stream: Annotated[str, typer.Option(help="stream to train on")] = "mosi",
    epochs: Annotated[int, typer.Option(help="epochs per task")] = 30,
    batch_size: Annotated[int, typer.Option()] = 64,
    seed: Annotated[int, typer.Option()] = 0,
    rounds: Annotated[int, typer.Option(help="alternated rounds of both loops")] = 3,
    data_dir: DataDirOption = None,
    cache_dir: CacheDirOption = None,
) -> None:
    """Time `naive` through Avalanche against the same training in a plain PyTorch loop."""
    from cmmm.overhead_benchmark import measure_overhead
    from cmmm.run_config import RunConfig

    config = RunConfig(stream=stream, epochs=epochs, batch_size=batch_size, seed=seed)
    config = with_directories(config, data_dir, cache_dir)
    report = measure_overhead(
        config, log=lambda m: console.print(m, highlight=False), rounds=rounds
    )
    Console(soft_wrap=True, markup=False).print(report.table())


@reports_errors
def benchmark_sweep(
    runs: Annotated[int, typer.Option(help="runs per mode (seeds 0..N-1)")] = 8,
    stream: Annotated[str, typer.Option(help="stream every run trains on")] = "synthetic",
    strategy: Annotated[str, typer.Option(help="strategy of every run")] = "naive",
    epochs: Annotated[int, typer.Option(help="epochs per task")] = 1,
    pretrain_epochs: Annotated[
        int | None, typer.Option(help="epochs of pre-training (done before timing)")
    ] = None,
    workers: Annotated[str, typer.Option(help="comma-separated Ray worker counts")] = "1,2",
    out: Annotated[
        Path | None,
        typer.Option(help="keep the runs here (default: a temporary directory, deleted)"),
    ] = None,
    data_dir: DataDirOption = None,
    cache_dir: CacheDirOption = None,
) -> None:
    """Sweep throughput: the same runs in one process, then on a local Ray with 1 and 2 workers."""
    import contextlib
    import tempfile

    from cmmm.run_config import RunConfig
    from cmmm.sweep_benchmark import measure_sweep_throughput

    try:
        worker_counts = [int(w) for w in workers.split(",") if w.strip()]
    except ValueError:
        raise ConfigError(f"--workers {workers!r}: write comma-separated integers") from None
    config = RunConfig(
        stream=stream, strategy=strategy, epochs=epochs, pretrain_epochs=pretrain_epochs
    )
    config = with_directories(config, data_dir, cache_dir)
    log = functools.partial(console.print, highlight=False)
    with contextlib.nullcontext(str(out)) if out else tempfile.TemporaryDirectory() as directory:
        report = measure_sweep_throughput(config, runs, Path(directory), worker_counts, log=log)
    Console(soft_wrap=True).print(report.table())


@reports_errors
def benchmark_modalities(
    modalities: Annotated[
        str, typer.Option(help="comma-separated modality counts M, each 2..6 (2^M - 1 tasks)")
    ] = "3,4,5",
    strategies: Annotated[
        str, typer.Option(help="comma-separated strategies run for every M")
    ] = "ours,ours-compositional",
    epochs: Annotated[int, typer.Option(help="epochs per task")] = 2,
    pretrain_epochs: Annotated[
        int, typer.Option(help="epochs of full-modality pre-training (cached per M)")
    ] = 3,
    seed: Annotated[int, typer.Option()] = 0,
    # Measured with one torch thread (paper MulT, 2 epochs, 3 pre-training epochs, 240 train
    # samples): with 240 test samples a run of `ours` took 15 s at M=3 and 79 s at M=4; at M=5
    # with 120 test samples 318 s, of which 104 s training and most of the rest evaluating all 31
    # tasks after each of the 31 steps (evaluation grows as (2^M - 1)^2 * n_test). With 120 test
    # samples the default benchmark (M = 3, 4, 5, two strategies) comes to about 12-13 minutes.
    n_train: Annotated[int, typer.Option(help="training samples of the synthetic stream")] = 240,
    n_test: Annotated[
        int,
        typer.Option(help="test samples of the synthetic stream (every task is scored on them)"),
    ] = 120,
    out: Annotated[
        Path,
        typer.Option(help="runs go to OUT/<run>/, the table to OUT/modality-benchmark.md and .csv"),
    ] = Path("runs/modality-benchmark"),
    device: DeviceOption = "auto",
    data_dir: DataDirOption = None,
    cache_dir: CacheDirOption = None,
) -> None:
    """Parameters, AA, FM and time on synthetic streams with M = 3, 4, 5 modalities."""
    from cmmm.modality_benchmark import benchmark_modalities as run_benchmark
    from cmmm.modality_benchmark import parse_modality_counts, parse_strategies
    from cmmm.run_config import RunConfig

    counts = parse_modality_counts(modalities)
    names = parse_strategies(strategies)
    base = RunConfig(
        epochs=epochs, pretrain_epochs=pretrain_epochs, seed=seed, out=str(out), device=device
    )
    base = with_directories(base, data_dir, cache_dir)
    report = run_benchmark(
        base,
        counts,
        names,
        n_train=n_train,
        n_test=n_test,
        log=lambda m: console.print(m, highlight=False, soft_wrap=True),
    )
    markdown_path, csv_path = report.write(out)
    Console(soft_wrap=True, markup=False).print(report.table())
    print()
    print(report.markdown(), end="")
    console.print(f"written: {markdown_path} and {csv_path}", highlight=False)
    if all(row.status == "failed" for row in report.rows):
        raise typer.Exit(code=1)
