"""`cmmm tune`: choose a strategy's options on the validation splits only (``cmmm.tuning``)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

from cmmm.cli.common import (
    CacheDirOption,
    DataDirOption,
    DeviceOption,
    console,
    reports_errors,
)
from cmmm.cli.compare import experiment_from_flags as experiment_from_file
from cmmm.cli.compare import parse_seeds
from cmmm.errors import ConfigError


@reports_errors
def tune(
    file: Annotated[
        Path | None,
        typer.Argument(help="an experiment file whose rows are the candidates (or use --grid)"),
    ] = None,
    stream: Annotated[str, typer.Option(help="the stream of a --grid study")] = "synthetic",
    strategy: Annotated[str, typer.Option(help="the strategy of a --grid study")] = "ours",
    grid: Annotated[
        list[str] | None,
        typer.Option(
            "--grid",
            "-g",
            help="NAME=V1,V2,... (repeatable; crossed): a run setting (lr, epochs, "
            "pretrain_epochs, ...) or a strategy option",
        ),
    ] = None,
    seeds: Annotated[
        str | None, typer.Option(help="comma-separated seeds [default: 0,1,2, or the file's]")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="epochs per task for every run")] = None,
    data_dir: DataDirOption = None,
    cache_dir: CacheDirOption = None,
    out: Annotated[
        Path, typer.Option(help="runs go to OUT/<run>/, the ranking to OUT/<name>.md")
    ] = Path("runs"),
    device: DeviceOption = "auto",
    finished_only: Annotated[
        bool,
        typer.Option("--finished-only", help="run nothing: rank the runs already finished"),
    ] = False,
) -> None:
    """Rank candidate configurations by validation AA and name the chosen one (test AA is
    shown for the record and never used to choose)."""
    from cmmm.data.catalog import STREAMS
    from cmmm.strategy import STRATEGIES
    from cmmm.tuning import DEFAULT_TUNE_SEEDS, experiment_from_flags, parse_grid
    from cmmm.tuning import tune as run_tune

    if file is not None:
        if grid:
            raise ConfigError("give the candidates once: a FILE or --grid flags, not both")
        experiment = experiment_from_file(
            file, out, epochs, seeds, data_dir, cache_dir, None, False
        )
    else:
        STREAMS.get(stream)
        STRATEGIES.get(strategy)
        base: dict[str, Any] = {"out": str(out), "device": device}
        if epochs is not None:
            base["epochs"] = epochs
        if data_dir is not None:
            base["data_dir"] = str(data_dir)
        if cache_dir is not None:
            base["cache_dir"] = str(cache_dir)
        experiment = experiment_from_flags(
            stream,
            strategy,
            parse_grid(grid or []),
            parse_seeds(seeds) if seeds is not None else DEFAULT_TUNE_SEEDS,
            base,
            out,
        )
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(
        [
            "cmmm tune",
            *([str(file)] if file is not None else [f"--stream {stream} --strategy {strategy}"]),
            *(f"--grid {shlex.quote(flag)}" for flag in grid or []),
            *([f"--seeds {seeds}"] if seeds is not None else []),
            *([f"--epochs {epochs}"] if epochs is not None else []),
        ]
    )
    table, chosen = run_tune(
        experiment,
        out,
        command,
        log=lambda m: console.print(m, highlight=False),
        finished_only=finished_only,
    )
    print(table)
    if chosen is not None:
        console.print(
            f"chosen settings written to {out / (experiment.source.stem + '.chosen.json')}"
        )
