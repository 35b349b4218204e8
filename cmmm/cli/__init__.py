"""The ``cmmm`` command line: ``app`` (the console entry point ``cmmm.cli:app``).

One module per command group; the commands are registered here, in the order ``cmmm --help``
shows them. Every command imports its heavy libraries (torch, Avalanche, Ray) inside its body, so
``cmmm --help`` and ``cmmm list`` start without them
(``tests/test_cmmm/test_cli/test_startup.py``). Errors end in one line, never a traceback
(``cmmm.cli.common.reports_errors``).
"""

from __future__ import annotations

from cmmm.cli import benchmark, compare, data, listing, plot, run, tune
from cmmm.cli.common import app, benchmark_app, data_app, list_app

app.command()(run.run)
app.command()(compare.summarize)
app.command()(compare.compare)
app.command()(plot.plot)
app.command()(compare.experiment)
app.command()(compare.sweep)
app.command()(tune.tune)

list_app.command("strategies")(listing.list_strategies)
list_app.command("streams")(listing.list_streams)

data_app.command("download")(data.data_download)
data_app.command("encode-text")(data.data_encode_text)

benchmark_app.command("speed")(benchmark.benchmark_speed)
benchmark_app.command("overhead")(benchmark.benchmark_overhead)
benchmark_app.command("sweep")(benchmark.benchmark_sweep)
benchmark_app.command("modalities")(benchmark.benchmark_modalities)


def main() -> None:  # pragma: no cover - console script entry
    app()


__all__ = ["app", "main"]
