"""What every command shares: the ``app`` and its groups, the console, error reporting, and the
options and helpers several commands take.

Every ``CmmmError`` ends the command with a one-line message on stderr and exit code 2, never a
traceback: the message says what was wrong and what to do. Any other failure ends in one line
too (``cmmm.cli_errors``): Ctrl-C exits with 130, others with 2.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cmmm.errors import CmmmError, ConfigError, one_line

if TYPE_CHECKING:  # the CLI starts without numpy; cmmm.results imports it
    from cmmm.results import Results

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Continual learning when modalities go missing.",
)
data_app = typer.Typer(no_args_is_help=True, help="Fetch and inspect data sets.")
benchmark_app = typer.Typer(no_args_is_help=True, help="Measure speed.")
app.add_typer(data_app, name="data")
app.add_typer(benchmark_app, name="benchmark")
list_app = typer.Typer(no_args_is_help=True, help="Show the registered strategies and streams.")
app.add_typer(list_app, name="list")

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
# Where a run computes, shared by every command that trains.
DeviceOption = Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda[:N]")]

# Run settings shared by `run` and `compare` (and, for --epochs and --out, `experiment` and
# `sweep`): one declaration each, so that a flag means the same in every command.
EpochsOption = Annotated[
    int | None,
    typer.Option(help="epochs per task, for every run [stream default: 30 real, 5 synthetic]"),
]
PretrainEpochsOption = Annotated[
    int | None, typer.Option(help="epochs of full-modality pre-training (cached)")
]
BatchSizeOption = Annotated[int, typer.Option(help="training mini-batch size")]
LrOption = Annotated[float, typer.Option(help="Adam learning rate")]
TaskOrderOption = Annotated[
    str,
    typer.Option(help="'default', 1-based indices '1,3,2' or present-modality codes 'avt,vt,t'"),
]
TaskDataOption = Annotated[
    str,
    typer.Option(
        help="'full': every task sees the whole train split; 'disjoint': one partition per task"
    ),
]
TextOption = Annotated[
    str | None,
    typer.Option(help="mosi only: 'utterance' vectors, or a `cmmm data encode-text` name"),
]
OutOption = Annotated[
    Path,
    typer.Option(
        help="runs are written to OUT/<stream>-<strategy>-seed<seed>-<key>/, tables to OUT/"
    ),
]
ThreadsOption = Annotated[
    int,
    typer.Option(
        help="intra-op CPU threads of this run; 1 is fastest on a small shared machine "
        "(run several runs side by side instead)"
    ),
]

# The options of the commands of many runs: `compare`, `experiment` and `sweep`.
SeedsOption = Annotated[
    str | None, typer.Option(help="comma-separated seeds, replacing the file's")
]
ReferenceOption = Annotated[
    str | None,
    typer.Option(
        help="the row every other row's AA is compared with, seed by seed [default: naive; for "
        "an experiment file its reference, else the first row whose strategy is naive]"
    ),
]
HeadroomOption = Annotated[
    bool,
    typer.Option(
        help="add the zeroshot and joint rows (made from the base settings; to a --strategies "
        "list also the reference)"
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


def parse_options(pairs: list[str], flag: str = "--option") -> dict[str, Any]:
    """``-o key=value`` pairs (or another ``flag``'s); values are read as JSON where possible
    (numbers, booleans)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {pair!r}: write key=value")
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


def summary_table(results: Results) -> Table:
    tasks = results.stream.tasks
    table = Table(
        title=f"{results.stream.name} / {results.strategy.name}: accuracy (%) on each task "
        "(columns) after training each step (rows)"
    )
    table.add_column("after step")
    for task in tasks:
        table.add_column(task.code, justify="right")
    for step, row in enumerate(results.matrix):
        if not results.strategy.trained:
            label = "untrained (zero-shot)"
        elif results.strategy.joint:
            label = "joint (all tasks)"
        else:
            label = f"{step + 1}: {tasks[step].name}"
        table.add_row(label, *("" if v is None else f"{v:.1f}" for v in row))
    return table


def given_on_command_line(ctx: typer.Context, name: str) -> bool:
    """True when the user typed the option (or set it by environment), not its default."""
    source = ctx.get_parameter_source(name)
    # Compared by name: typer ships its own copy of click, whose enum is not click's.
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")


def directory_overrides(data_dir: Path | None, cache_dir: Path | None) -> dict[str, Any]:
    """--data-dir/--cache-dir as ``RunConfig`` settings, when given; the settings left out
    take the environment's defaults (``cmmm.run_config.default_data_dir``)."""
    overrides: dict[str, Any] = {}
    if data_dir is not None:
        overrides["data_dir"] = str(data_dir)
    if cache_dir is not None:
        overrides["cache_dir"] = str(cache_dir)
    return overrides


def with_directories(config: Any, data_dir: Path | None, cache_dir: Path | None) -> Any:
    """Apply --data-dir/--cache-dir when given (else the RunConfig's environment defaults)."""
    for name, value in directory_overrides(data_dir, cache_dir).items():
        setattr(config, name, value)
    return config


def format_metric(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


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
