"""Experiment files: several labelled configurations x several seeds -> one Markdown table.

An experiment is a TOML file under ``experiments/``::

    title = "Table 3: prompt types without the contrastive loss"
    stream = "mosi"
    seeds = [0, 1, 2]

    [base]                      # RunConfig fields shared by every row
    strategy = "ours"
    strategy_options = { lam = 0.0 }

    [[rows]]
    label = "P_m"
    paper = "64.07 / 4.01"      # optional: the paper's AA / FM, shown for reference
    strategy_options = { use_task_aware = false, use_task_specific = false }

A row's fields override the base's; its ``strategy_options``, ``stream_options`` and
``backbone_options`` are merged into the base's (row wins), except that a row naming another
strategy than the base does not inherit the base's strategy options. ``cmmm experiment FILE``
runs (or reuses) every row for every seed and writes ``OUT/<file stem>.md``.
"""

from __future__ import annotations

import statistics
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmmm.comparison import RunOutcome, run_or_reuse
from cmmm.errors import ConfigError
from cmmm.running import RunConfig, atomic_write_text
from cmmm.summary import mean_spread

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MERGED_OPTIONS = ("strategy_options", "stream_options", "backbone_options")
ROW_ONLY = ("label", "paper")


@dataclass
class ExperimentRow:
    label: str
    config: RunConfig
    paper: str | None = None


@dataclass
class Experiment:
    title: str
    seeds: list[int]
    rows: list[ExperimentRow]
    source: Path


def load_experiment(path: Path, overrides: dict[str, Any] | None = None) -> Experiment:
    """Parse and check an experiment file; ``overrides`` (RunConfig fields) apply to every row."""
    try:
        spec = tomllib.loads(Path(path).read_text())
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the experiment file ({error})") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error})") from None
    rows_spec = spec.get("rows")
    if not isinstance(rows_spec, list) or not rows_spec:
        raise ConfigError(f"{path}: needs at least one [[rows]] table")
    seeds = spec.get("seeds", [0])
    if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds) or not seeds:
        raise ConfigError(f"{path}: seeds must be a non-empty list of integers, got {seeds!r}")
    base = dict(spec.get("base", {}))
    if "stream" in spec:
        base.setdefault("stream", spec["stream"])
    rows = []
    for index, row_spec in enumerate(rows_spec, start=1):
        where = f"{path} row {index}"
        if "label" not in row_spec:
            raise ConfigError(f"{where}: every row needs a label")
        values = {**base, **{k: v for k, v in row_spec.items() if k not in ROW_ONLY}}
        for key in MERGED_OPTIONS:
            inherited = base.get(key, {})
            # Another strategy's options mean nothing to this row's strategy.
            if key == "strategy_options" and values.get("strategy") != base.get("strategy"):
                inherited = {}
            values[key] = {**inherited, **row_spec.get(key, {})}
        values.update(overrides or {})
        config = RunConfig.from_mapping(values, where)
        rows.append(ExperimentRow(str(row_spec["label"]), config, row_spec.get("paper")))
    labels = [row.label for row in rows]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{path}: row labels must be unique, got {labels}")
    return Experiment(str(spec.get("title", Path(path).stem)), seeds, rows, Path(path))


def markdown_table(experiment: Experiment, outcomes: dict[str, list[RunOutcome]]) -> str:
    has_paper = any(row.paper for row in experiment.rows)
    header = ["configuration", "AA (%)", "FM", "trainable", "time/run (s)", "seeds"]
    if has_paper:
        header.append("paper AA / FM")
    first = experiment.rows[0].config.resolved()
    lines = [
        f"### {experiment.title}",
        "",
        f"Stream `{first.stream}`, {first.epochs} epochs per task; mean ± sample standard "
        f"deviation over seeds {experiment.seeds}. Produced by `cmmm experiment "
        f"{experiment.source}`.",
        "",
        "| " + " | ".join(header) + " |",
        "|---" + "|---:" * (len(header) - 1) + "|",
    ]
    for row in experiment.rows:
        results = [o.result for o in outcomes[row.label] if o.result is not None]
        failed = [o.seed for o in outcomes[row.label] if o.status == "failed"]
        aa = [r["aa"] for r in results if r["aa"] is not None]
        fm = [r["fm"] for r in results if r["fm"] is not None]
        cells = [
            row.label,
            mean_spread(aa),
            mean_spread(fm),
            f"{results[0]['parameters']['trainable']:,}" if results else "-",
            f"{statistics.mean(r['wall_time_seconds'] for r in results):.0f}" if results else "-",
            f"{len(results)}" + (f" ({len(failed)} failed)" if failed else ""),
        ]
        if has_paper:
            cells.append(row.paper or "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def experiment_figure(experiment: Experiment, outcomes: dict[str, list[RunOutcome]]) -> Figure:
    """AA and FM per row (mean ± std over seeds, each seed a dot), in the file's row order."""
    from cmmm.plotting import RunGroup, comparison_figure
    from cmmm.results import Results

    groups = [
        RunGroup(row.label, [Results(o.results_path, o.result) for o in found])
        for row in experiment.rows
        if (found := [o for o in outcomes[row.label] if o.result is not None])
    ]
    if not groups:
        raise ConfigError(f"{experiment.source}: no row has a finished run to plot")
    return comparison_figure(
        groups, f"{experiment.title}: mean ± std over seeds {experiment.seeds}; grey dots: seeds"
    )


def run_experiment(
    experiment: Experiment,
    out: Path,
    log: Callable[[str], None] = print,
    figure: Path | None = None,
) -> tuple[str, Path]:
    """Run or reuse every (row, seed); write and return the Markdown table (and the figure)."""
    if figure is not None:
        from cmmm.plotting import check_output

        check_output(figure)  # a wrong suffix fails before hours of runs, not after
    outcomes: dict[str, list[RunOutcome]] = {}
    total = len(experiment.rows) * len(experiment.seeds)
    done = 0
    for row in experiment.rows:
        outcomes[row.label] = []
        for seed in experiment.seeds:
            done += 1
            config = RunConfig(**{**row.config.__dict__, "seed": seed}).resolved()
            label = f"[{done}/{total}] {row.label} seed {seed}"
            outcomes[row.label].append(run_or_reuse(config, label, log))
    table = markdown_table(experiment, outcomes)
    path = Path(out) / f"{experiment.source.stem}.md"
    atomic_write_text(path, table)
    if figure is not None:
        from cmmm.plotting import save_figure

        save_figure(experiment_figure(experiment, outcomes), figure)
        log(f"figure written to {figure}")
    return table, path
