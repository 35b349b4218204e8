"""`cmmm list`: the registered strategies and streams, read from ``cmmm/listing.json``
(no torch)."""

from __future__ import annotations

from rich.console import Console

from cmmm.cli.common import (
    reports_errors,
)


def print_entries(entries: list[tuple[str, str, dict[str, str]]]) -> None:
    from rich.markup import escape

    out = Console(soft_wrap=True, highlight=False)
    width = max(len(name) for name, _, _ in entries)
    for name, description, options in entries:
        out.print(f"[bold]{name:<{width}}[/]  {escape(description)}")
        for option, text in options.items():
            out.print(f"{'':<{width}}    {option}: {text}", markup=False)


@reports_errors
def list_strategies() -> None:
    """Every strategy `--strategy` accepts: what it is and its options (-o name=value)."""
    from cmmm.listing import stored_listing

    print_entries(stored_listing()["strategies"])


@reports_errors
def list_streams() -> None:
    """Every stream `--stream` accepts: what it is, its defaults and its stream options."""
    from cmmm.listing import stored_listing

    print_entries(stored_listing()["streams"])
