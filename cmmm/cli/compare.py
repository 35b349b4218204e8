"""Many runs at once: `cmmm compare`, `cmmm experiment`, `cmmm sweep`, and `cmmm summarize`
over seeds."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Any

import typer

from cmmm.cli.common import (
    BatchSizeOption,
    CacheDirOption,
    DataDirOption,
    DeviceOption,
    EpochsOption,
    EvalPatternsOption,
    HeadroomOption,
    LrOption,
    MissingModeOption,
    MissingRateOption,
    OutOption,
    PretrainEpochsOption,
    ReferenceOption,
    SeedsOption,
    TaskDataOption,
    TaskOrderOption,
    TextOption,
    console,
    directory_overrides,
    reports_errors,
    text_stream_options,
)
from cmmm.errors import ConfigError


@reports_errors
def summarize(
    paths: Annotated[list[Path], typer.Argument(help="run directories or results.json files")],
) -> None:
    """Mean ± standard deviation over seeds of AA, FM and BWT, per configuration (Markdown)."""
    from cmmm.results import find_results
    from cmmm.summary import aggregate, markdown_table

    rows = aggregate(find_results(paths))
    if not rows:
        raise ConfigError(f"no results.json under {', '.join(map(str, paths))}")
    print(markdown_table(rows))


@reports_errors
def compare(
    stream: Annotated[str, typer.Option(help="the stream every strategy runs on")] = "synthetic",
    strategies: Annotated[
        str,
        typer.Option(
            help="comma-separated strategies, or 'all'; a replay family (er, agem, icarl, der) "
            "stands for its two paper buffer sizes on the stream"
        ),
    ] = "all",
    seeds: Annotated[
        int, typer.Option(help="seeds 0..N-1, the same for every strategy (runs pair by seed)")
    ] = 5,
    reference: ReferenceOption = None,
    headroom: HeadroomOption = True,
    epochs: EpochsOption = None,
    pretrain_epochs: PretrainEpochsOption = None,
    batch_size: BatchSizeOption = 64,
    lr: LrOption = 1e-3,
    task_order: TaskOrderOption = "default",
    task_data: TaskDataOption = "full",
    eval_patterns: EvalPatternsOption = "",
    missing_rate: MissingRateOption = 1.0,
    missing_mode: MissingModeOption = "pattern",
    text: TextOption = None,
    data_dir: DataDirOption = None,
    cache_dir: CacheDirOption = None,
    out: OutOption = Path("runs"),
    device: DeviceOption = "auto",
    orders: Annotated[
        int,
        typer.Option(
            help="K > 0: repeat the comparison under K random task orders and report AA/FM "
            "across orders (replaces --task-order)"
        ),
    ] = 0,
    order_seed: Annotated[int, typer.Option(help="seed of the random task orders")] = 0,
    finished_only: Annotated[
        bool,
        typer.Option(
            "--finished-only",
            help="run nothing: the table of the runs already finished, listing the others",
        ),
    ] = False,
) -> None:
    """Run (or reuse finished runs of) several strategies over seeds; print a Table-2 table."""
    from cmmm.comparison import DEFAULT_REFERENCE, expand_strategies, with_headroom
    from cmmm.comparison import compare as compare_runs
    from cmmm.data.catalog import STREAMS
    from cmmm.run_config import RunConfig

    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    reference = DEFAULT_REFERENCE if reference is None else reference
    STREAMS.get(stream)  # an unknown name lists the valid ones before any run is planned
    base = RunConfig(
        stream=stream,
        epochs=epochs,
        pretrain_epochs=pretrain_epochs,
        batch_size=batch_size,
        lr=lr,
        task_order=task_order,
        task_data=task_data,
        eval_patterns=eval_patterns,
        missing_rate=missing_rate,
        missing_mode=missing_mode,
        out=str(out),
        device=device,
        stream_options=text_stream_options(stream, text),
        **directory_overrides(data_dir, cache_dir),
    )
    names = expand_strategies(strategies, stream)
    if headroom:
        names = with_headroom(names, reference)
    console.print(f"{stream}: {', '.join(names)} x seeds 0..{seeds - 1}", highlight=False)
    if orders:
        from cmmm.comparison import compare_orders, random_task_orders
        from cmmm.config import resolve
        from cmmm.running import load_stream

        if task_order != "default":
            raise ConfigError("--orders draws the task orders; do not also give --task-order")
        stream_of_base = load_stream(resolve(base).config, log=lambda _m: None)
        task_codes = [task.code for task in stream_of_base.tasks]
        by_order = compare_orders(
            base,
            names,
            list(range(seeds)),
            random_task_orders(orders, len(task_codes), order_seed),
            log=lambda m: console.print(m, highlight=False),
            finished_only=finished_only,
            task_codes=task_codes,
        )
        markdown_path, csv_path = by_order.write(out)
        print(by_order.markdown(), end="")
        console.print(f"written: {markdown_path} and {csv_path}", highlight=False)
        return
    comparison = compare_runs(
        base,
        names,
        list(range(seeds)),
        log=lambda m: console.print(m, highlight=False),
        finished_only=finished_only,
        reference=reference,
    )
    markdown_path, csv_path = comparison.write(out)
    print(comparison.markdown(), end="")
    console.print(f"written: {markdown_path} and {csv_path}", highlight=False)
    if all(o.status == "failed" for o in comparison.outcomes):
        raise typer.Exit(code=1)


@reports_errors
def experiment(
    file: Annotated[Path, typer.Argument(help="an experiment TOML file (see experiments/)")],
    seeds: SeedsOption = None,
    epochs: EpochsOption = None,
    out: OutOption = Path("runs"),
    data_dir: DataDirOption = None,
    cache_dir: CacheDirOption = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            help="also draw AA and FM per row (mean ± 95 % CI, seeds as dots): .png or .svg"
        ),
    ] = None,
    reference: ReferenceOption = None,
    headroom: HeadroomOption = True,
    finished_only: Annotated[
        bool,
        typer.Option("--finished-only", help="run nothing: the table of the finished runs"),
    ] = False,
) -> None:
    """Run (or reuse) every row of an experiment file for every seed; write a Markdown table."""
    from cmmm.experiments import run_experiment

    spec = experiment_from_flags(
        file, out, epochs, seeds, data_dir, cache_dir, reference=reference, headroom=headroom
    )
    table, path = run_experiment(
        spec,
        out,
        log=lambda m: console.print(m, highlight=False),
        figure=plot,
        finished_only=finished_only,
    )
    print(table)
    console.print(f"table written to {path}", highlight=False)


def experiment_from_flags(
    file: Path,
    out: Path,
    epochs: int | None,
    seeds: str | None,
    data_dir: Path | None,
    cache_dir: Path | None,
    reference: str | None = None,
    headroom: bool = True,
) -> Any:
    """An experiment file with the flags `experiment` and `sweep` share applied to every run."""
    from cmmm.experiments import load_experiment, with_headroom_rows

    overrides: dict[str, Any] = {"out": str(out), **directory_overrides(data_dir, cache_dir)}
    if epochs is not None:
        overrides["epochs"] = epochs
    experiment = load_experiment(file, overrides)
    if headroom:
        experiment = with_headroom_rows(experiment, overrides)
    if reference is not None:
        experiment.reference = reference
    experiment.reference_label()  # an unknown reference fails before any run
    if seeds is not None:
        experiment.seeds = parse_seeds(seeds)
    return experiment


def parse_seeds(seeds: str) -> list[int]:
    try:
        parsed = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {seeds!r}: write comma-separated integers") from None
    if not parsed:
        raise ConfigError(f"--seeds {seeds!r}: name at least one seed")
    return parsed


@reports_errors
def sweep(
    file: Annotated[
        Path, typer.Argument(help="an experiment file (TOML): rows and/or a grid table, x seeds")
    ],
    address: Annotated[
        str | None,
        typer.Option(
            envvar="RAY_ADDRESS",
            help="an existing Ray cluster: host:6379, ray://host:10001, or auto (one started "
            "on this machine); default: start a local Ray",
        ),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="CPUs of the local Ray (default: all of this machine's)")
    ] = None,
    cpus_per_run: Annotated[
        int, typer.Option(help="CPUs reserved (and torch threads) per run")
    ] = 1,
    retries: Annotated[
        int, typer.Option(help="new attempts after a run fails (worker died or error)")
    ] = 1,
    seeds: SeedsOption = None,
    epochs: EpochsOption = None,
    out: OutOption = Path("runs"),
    data_dir: DataDirOption = None,
    cache_dir: CacheDirOption = None,
    ship_code: Annotated[
        bool,
        typer.Option(
            help="upload this cmmm's code to the workers (Ray py_modules) instead of using "
            "the cmmm installed on the cluster's nodes"
        ),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option(help="list the runs and which are finished; start nothing")
    ] = False,
    reference: ReferenceOption = None,
    headroom: HeadroomOption = True,
) -> None:
    """Run an experiment file's grid as Ray tasks; skip finished runs; write the table."""
    import contextlib

    from cmmm.sweeping import plan_sweep, ray_session, run_sweep

    experiment = experiment_from_flags(
        file, out, epochs, seeds, data_dir, cache_dir, reference=reference, headroom=headroom
    )
    log = functools.partial(console.print, highlight=False, soft_wrap=True)
    if dry_run:
        plan = plan_sweep(experiment)
        print(f"{file}: {len(plan.runs)} runs, {len(plan.to_run)} to run")
        for run in plan.runs:
            status = "finished" if run.config.run_dir() in plan.finished else "to run"
            print(f"{status:8}  {run.label} seed {run.seed}  {run.config.run_dir()}")
        return
    # A finished sweep needs no Ray: only its table is written again.
    session = ray_session(address, workers, ship_code) if plan_sweep(experiment).to_run else None
    with session or contextlib.nullcontext():
        report = run_sweep(experiment, out, cpus_per_run, retries, log=log)
    print(report.table, end="")
    log(f"written: {report.markdown_path} and {report.csv_path}")
    if report.failures:
        log(f"{len(report.failures)} run(s) failed (error files in their run directories):")
        for label, outcome in report.failures:
            log(f"  {label} seed {outcome.seed}: {outcome.error}")
        raise typer.Exit(code=1)
