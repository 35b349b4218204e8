"""`cmmm plot`: pictures of finished runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cmmm.cli.common import (
    console,
    reports_errors,
)


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
