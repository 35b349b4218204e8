"""`cmmm run`: train one strategy on one stream (or resume a run) and print its table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cmmm.cli.common import (
    BatchSizeOption,
    CacheDirOption,
    DataDirOption,
    DeviceOption,
    EpochsOption,
    EvalPatternsOption,
    LrOption,
    MissingModeOption,
    MissingRateOption,
    OutOption,
    PretrainEpochsOption,
    TaskDataOption,
    TaskOrderOption,
    TextOption,
    ThreadsOption,
    console,
    directory_overrides,
    format_metric,
    given_on_command_line,
    parse_options,
    reports_errors,
    summary_table,
    text_stream_options,
)
from cmmm.errors import ConfigError


@reports_errors
def run(
    ctx: typer.Context,
    stream: Annotated[
        str, typer.Option(help="synthetic, synthetic-cls, mosi, mfeat, mosi-pkl, iemocap, sims")
    ] = "synthetic",
    strategy: Annotated[
        str, typer.Option(help="a registered strategy (naive, joint, ...)")
    ] = "naive",
    epochs: EpochsOption = None,
    batch_size: BatchSizeOption = 64,
    lr: LrOption = 1e-3,
    seed: Annotated[int, typer.Option(help="seed for pre-training, training and task data")] = 0,
    task_order: TaskOrderOption = "default",
    task_data: TaskDataOption = "full",
    pretrain_epochs: PretrainEpochsOption = None,
    data_dir: DataDirOption = None,
    cache_dir: CacheDirOption = None,
    out: OutOption = Path("runs"),
    device: DeviceOption = "auto",
    threads: ThreadsOption = 1,
    standardize: Annotated[
        bool, typer.Option(help="z-score every feature with train-split statistics")
    ] = True,
    text: TextOption = None,
    eval_patterns: EvalPatternsOption = "",
    missing_rate: MissingRateOption = 1.0,
    missing_mode: MissingModeOption = "pattern",
    option: Annotated[
        list[str] | None,
        typer.Option("--option", "-o", help="strategy option key=value (repeatable)"),
    ] = None,
    stream_option: Annotated[
        list[str] | None,
        typer.Option(
            "--stream-option",
            "-s",
            help="stream option key=value (repeatable; `cmmm list streams` lists them), e.g. "
            "-s views=fou,fac,kar,pix,zer,mor",
        ),
    ] = None,
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="a TOML file of run settings (or a finished run's results.json); "
            "flags given on the command line override it",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option(help="print the fully resolved configuration as TOML and stop")
    ] = False,
    parameters: Annotated[
        bool,
        typer.Option(
            help="build the model and print its trainable parameters against the backbone's, "
            "then stop (no pre-training: the counts do not depend on the weights)"
        ),
    ] = False,
    resume: Annotated[
        Path | None,
        typer.Option(
            metavar="RUN_DIR",
            help="continue an interrupted run from its last checkpoint, with the configuration "
            "saved there (only --data-dir, --cache-dir and --device may be given with it)",
        ),
    ] = None,
) -> None:
    """Train one strategy on one missing-modality stream and score it after every task."""
    from cmmm.config import resolve
    from cmmm.config_files import config_to_toml, read_config_file

    if resume is not None:
        resumed = resumed_config(ctx, resume, data_dir=data_dir, cache_dir=cache_dir)
        if resumed is None:
            return
        train_and_report(resumed, resume=True)
        return

    flags = {
        "stream": stream,
        "strategy": strategy,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "task_order": task_order,
        "task_data": task_data,
        "eval_patterns": eval_patterns,
        "missing_rate": missing_rate,
        "missing_mode": missing_mode,
        "standardize": standardize,
        "pretrain_epochs": pretrain_epochs,
        "out": str(out),
        "device": device,
        "threads": threads,
        "data_dir": None if data_dir is None else str(data_dir),
        "cache_dir": None if cache_dir is None else str(cache_dir),
    }
    values = read_config_file(config_file) if config_file is not None else {}
    if config_file is not None and given_on_command_line(ctx, "strategy"):
        # The file's strategy options belong to the file's strategy.
        if values.get("strategy") != strategy:
            values.pop("strategy_options", None)
    for name, value in flags.items():
        if value is not None and (config_file is None or given_on_command_line(ctx, name)):
            values[name] = value
    values["strategy_options"] = {
        **values.get("strategy_options", {}),
        **parse_options(option or []),
    }
    values["stream_options"] = {
        **values.get("stream_options", {}),
        **parse_options(stream_option or [], "--stream-option"),
        **text_stream_options(values.get("stream", "synthetic"), text),
    }
    resolved = resolve(values, where=str(config_file or "command line"))
    config = resolved.config
    if dry_run:
        in_effect = "".join(f"\n  {k} = {v!r}" for k, v in resolved.strategy.options().items())
        header = (
            f"cmmm run configuration (run key {config.key()})\n"
            f"{config.strategy} runs with these options (defaults unless set below):"
            f"{in_effect or ' none'}"
        )
        print(config_to_toml(config, header=header), end="")
        return
    if parameters:
        from cmmm.running import parameter_counts

        print(parameter_counts(resolved, log=lambda m: console.print(m, highlight=False)).text())
        return

    train_and_report(resolved, resume=False)


def resumed_config(
    ctx: typer.Context, run_dir: Path, data_dir: Path | None, cache_dir: Path | None
) -> Any:
    """The configuration to continue the run in ``run_dir`` with; None when it is finished."""
    from cmmm.checkpoints import CHECKPOINT_FILE
    from cmmm.config import resolve
    from cmmm.errors import CheckpointError
    from cmmm.running import RESULTS_FILE, resumable_config

    allowed = {"resume", "data_dir", "cache_dir", "device", "threads"}
    given = [n for n in ctx.params if n not in allowed and given_on_command_line(ctx, n)]
    if given:
        flags = ", ".join(
            "--config" if name == "config_file" else "--" + name.replace("_", "-") for name in given
        )
        raise ConfigError(
            f"--resume continues a run with the configuration saved in its checkpoint; {flags} "
            "cannot be given with it (only --data-dir, --cache-dir, --device and --threads can)"
        )
    if not run_dir.is_dir():
        raise CheckpointError(f"--resume {run_dir}: no such run directory")
    results = run_dir / RESULTS_FILE
    if not (run_dir / CHECKPOINT_FILE).exists():
        if results.exists():
            console.print(
                f"{run_dir}: the run is finished; results in {results}",
                highlight=False,
                soft_wrap=True,
            )
            return None
        raise CheckpointError(
            f"{run_dir}: no {CHECKPOINT_FILE} to resume from; start the run with `cmmm run`"
        )
    resolved, checkpoint = resumable_config(run_dir)
    if checkpoint.finished and results.exists():
        console.print(
            f"{run_dir}: the run is finished; results in {results}",
            highlight=False,
            soft_wrap=True,
        )
        return None
    # Where and how the run computes may change on resuming; what it computes may not.
    changes = directory_overrides(data_dir, cache_dir)
    for name in ("device", "threads"):
        if given_on_command_line(ctx, name):
            changes[name] = ctx.params[name]
    return resolve(resolved, **changes)


def train_and_report(config: Any, resume: bool) -> None:
    """Run (or continue) ``config`` with a progress bar, then print its accuracy table."""
    from cmmm.results import RESULTS_FILE, Results
    from cmmm.running import run as run_config

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        bar = progress.add_task("loading", total=None, loss="-")

        def on_epoch(step: int, epoch: int, loss: float) -> None:
            progress.update(
                bar, advance=1, loss=f"{loss:.4f}", description=f"step {step + 1} epoch {epoch + 1}"
            )

        def on_step(step: int, per_task: list[dict[str, float]]) -> None:
            mean = sum(m["acc"] for m in per_task[: step + 1]) / (step + 1)
            progress.console.print(
                f"after step {step + 1}: accuracy on tasks seen so far {mean:.2f}%", highlight=False
            )

        def log(message: str) -> None:
            progress.console.print(message, highlight=False)

        def start_training(total_epochs: int) -> None:
            progress.update(bar, total=total_epochs, completed=0, description="training")

        record = run_config(
            config,
            log=log,
            on_epoch=on_epoch,
            on_step=on_step,
            on_start=start_training,
            resume=resume,
        )
    results = Results.from_json(record)
    out_console = Console(soft_wrap=True, markup=False)
    out_console.print(summary_table(results))
    out_console.print(
        f"AA {format_metric(results.aa)}  FM {format_metric(results.fm)}  "
        f"BWT {format_metric(results.bwt)}  trainable parameters "
        f"{results.parameters.trainable:,} / {results.parameters.total:,}  "
        f"wall time {results.wall_time_seconds:.1f} s",
        highlight=False,
    )
    held_out = results.held_out
    if held_out:
        cells = ", ".join(
            f"{task.code} {final['acc']:.1f}"
            for task, final in zip(held_out.tasks, held_out.per_task_final, strict=True)
        )
        out_console.print(
            f"held-out missing cases (never trained on): AA {format_metric(held_out.aa)} ({cells})",
            highlight=False,
        )
    out_console.print(f"results: {results.directory / RESULTS_FILE}", highlight=False)
