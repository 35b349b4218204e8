"""Experiment files: labelled configurations (and grids of them) x seeds -> one table.

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
    claim = "below"             # optional: the paper's direction against the reference row
    strategy_options = { use_task_aware = false, use_task_specific = false }

A row's fields override the base's; its ``strategy_options``, ``stream_options`` and
``backbone_options`` are merged into the base's (row wins), except that a row naming another
strategy than the base does not inherit the base's strategy options.

A ``[grid]`` table crosses every row with every combination of the values it lists (a file
without rows is one row made of the base)::

    [grid]
    strategy = ["naive", "ewc"]
    epochs = [1, 2]
    strategy_options.lam = [0.1, 1.0]     # or a [grid.strategy_options] table

Each combination becomes a row labelled ``<row label> strategy=ewc epochs=1 lam=0.1``; a grid
value overrides the row's and the base's. A row may carry its own grid (``[rows.grid]`` after its
``[[rows]]``), which adds to (and for the same setting replaces) the file's. ``seed`` may be
listed in the file's grid instead of ``seeds``.

``cmmm experiment FILE`` runs (or reuses) every row for every seed one after another in this
process (``collect_outcomes``), ``cmmm sweep FILE`` as Ray tasks (``cmmm.sweeping``); both write
``OUT/<file stem>.md`` and ``.csv``. ``cmmm compare`` is an experiment too, built from its flags
(``strategies_experiment``): one row per strategy, run by ``collect_outcomes``, with a table of
its own (``cmmm.comparison``). Every row's numbers over seeds are ``cmmm.summary.SeedStatistics``.

Without ``seeds`` a file runs seeds 0-4. Each row shows mean ± the half-width of its 95 %
confidence interval over seeds (Student t) and, against a reference row (``reference = "<row
label>"`` in the file, or ``--reference``; by default the first row whose strategy is ``naive``),
the paired difference of AA over the seeds both finished (``cmmm.significance``). The command
line adds a ``zeroshot`` and a ``joint`` row made from the base settings (``with_headroom_rows``)
unless the file says ``headroom = false`` or ``--no-headroom`` is given.

Rows that say what the paper found get a verdict. A row's claim is its ``claim`` ("above" or
"below" the reference row: for the paper's statements without numbers, as "m, TA, TS is the
best order"), else the direction of its ``paper`` AA against the reference row's. The verdict
(``cmmm.significance.verdict``) is "reproduced" when the row's paired interval against the
reference excludes 0 on the paper's side, "not reproduced" on the other side, "undecided" when
it includes 0.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import statistics
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmmm.atomic_files import atomic_write_text
from cmmm.config import resolve
from cmmm.errors import ConfigError
from cmmm.outcomes import RunOutcome, run_or_reuse
from cmmm.run_config import RunConfig, complete
from cmmm.significance import (
    CLAIMS,
    difference_cell,
    significance_footer,
    verdict,
    verdict_footer,
)
from cmmm.summary import SeedStatistics, paired_differences, unpaired_note

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MERGED_OPTIONS = ("strategy_options", "stream_options", "backbone_options")
# Five seeds unless the file says otherwise: enough for a 95 % interval to tell rows apart.
DEFAULT_SEEDS = [0, 1, 2, 3, 4]
# The rows every table shows unless told not to: what training adds over the pre-trained
# backbone (zeroshot) and what training on all tasks at once reaches (joint).
HEADROOM_STRATEGIES: tuple[str, ...] = ("zeroshot", "joint")

ROW_ONLY = ("label", "paper", "claim", "grid")

# A grid dimension: the setting it varies, ("epochs",) or ("strategy_options", "lam"), and the
# values it takes.
GridDimension = tuple[tuple[str, ...], list[Any]]


@dataclass
class ExperimentRow:
    label: str
    config: RunConfig
    paper: str | None = None
    # The grid values that made this row (setting name -> value); empty without a grid.
    grid_point: dict[str, Any] = field(default_factory=dict)
    # The paper's direction against the reference row when it gives no numbers ("above" or
    # "below"; None: from the paper numbers, if any).
    claim: str | None = None

    def paper_aa(self) -> float | None:
        """The AA in ``paper`` ("71.87 / 0.13": 71.87); None without one."""
        try:
            return float((self.paper or "").split("/")[0])
        except ValueError:
            return None


@dataclass(frozen=True)
class PlannedRun:
    """One (row, seed) of an experiment: the resolved configuration that is run or reused."""

    label: str
    seed: int
    config: RunConfig


@dataclass
class Experiment:
    title: str
    seeds: list[int]
    rows: list[ExperimentRow]
    source: Path
    # The label of the row every other row's AA is compared with (None: see reference_label).
    reference: str | None = None
    # False: the file asks for no zeroshot/joint rows (``headroom = false``).
    headroom: bool = True

    def reference_label(self) -> str | None:
        """The reference row's label: the one given, else the first row whose strategy is
        naive, else None (no paired column)."""
        labels = [row.label for row in self.rows]
        if self.reference is not None:
            if self.reference not in labels:
                raise ConfigError(
                    f"{self.source}: reference {self.reference!r} is not a row label; "
                    f"choose one of {labels}"
                )
            return self.reference
        return next((row.label for row in self.rows if row.config.strategy == "naive"), None)

    def planned_runs(self) -> list[PlannedRun]:
        """Every (row, seed), in table order, resolved (stream defaults filled in, the strategy
        and its options checked): a bad row fails before any run starts."""
        planned = []
        for row in self.rows:
            for seed in self.seeds:
                try:
                    resolved = resolve(replace(row.config, seed=seed))
                except ConfigError as error:
                    raise ConfigError(f"row {row.label!r}: {error}") from None
                planned.append(PlannedRun(row.label, seed, resolved.config))
        return planned


def _grid_dimensions(grid: Any, where: str) -> list[GridDimension]:
    """The dimensions of a ``[grid]`` table, in the file's order."""
    if not isinstance(grid, dict):
        raise ConfigError(f"{where}: grid must be a table of lists, got {grid!r}")
    known = {f.name for f in fields(RunConfig)}
    flat: list[tuple[tuple[str, ...], Any]] = []
    for key, values in grid.items():
        head, dot, rest = key.partition(".")  # a quoted "strategy_options.lam"
        if dot:
            flat.append(((head, rest), values))
        elif key in MERGED_OPTIONS and isinstance(values, dict):
            flat += [((key, option), option_values) for option, option_values in values.items()]
        else:
            flat.append(((key,), values))
    dimensions: list[GridDimension] = []
    for path, values in flat:
        name = ".".join(path)
        if path[0] not in known:
            raise ConfigError(f"{where}: grid setting {name!r} is unknown; valid: {sorted(known)}")
        if path[0] in MERGED_OPTIONS and len(path) == 1:
            raise ConfigError(
                f"{where}: grid {name!r}: list one option at a time, e.g. {name}.lam = [0.1, 1.0]"
            )
        if path[0] not in MERGED_OPTIONS and len(path) > 1:
            raise ConfigError(f"{where}: grid {name!r}: {path[0]} has no sub-settings")
        if not isinstance(values, list) or not values:
            raise ConfigError(
                f"{where}: grid {name!r} must be a non-empty list of values, got {values!r}"
            )
        dimensions.append((path, values))
    return dimensions


def _point_label(point: Sequence[tuple[tuple[str, ...], Any]]) -> str:
    return " ".join(
        f"{path[-1]}={value if isinstance(value, str) else json.dumps(value)}"
        for path, value in point
    )


def _with_grid_point(
    row_spec: dict[str, Any], point: Sequence[tuple[tuple[str, ...], Any]]
) -> dict[str, Any]:
    """The row's settings with the grid point's values on top (options merged per key)."""
    settings = {k: v for k, v in row_spec.items() if k not in ROW_ONLY}
    for path, value in point:
        if len(path) == 1:
            settings[path[0]] = value
        else:
            settings[path[0]] = {**settings.get(path[0], {}), path[1]: value}
    return settings


def load_experiment(path: Path, overrides: dict[str, Any] | None = None) -> Experiment:
    """Parse and check an experiment file; ``overrides`` (RunConfig fields) apply to every row."""
    try:
        spec = tomllib.loads(Path(path).read_text())
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the experiment file ({error})") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error})") from None
    return experiment_from_spec(spec, Path(path), overrides)


def experiment_from_spec(
    spec: dict[str, Any], path: Path, overrides: dict[str, Any] | None = None
) -> Experiment:
    """An experiment from the parsed contents of a file (or a mapping built from flags, with
    ``path`` naming its tables); checked as ``load_experiment`` checks a file."""
    file_grid = _grid_dimensions(spec.get("grid", {}), f"{path} [grid]")
    seeds = spec.get("seeds", DEFAULT_SEEDS)
    grid_seeds = [values for name, values in file_grid if name == ("seed",)]
    if grid_seeds:
        if "seeds" in spec:
            raise ConfigError(f"{path}: give the seeds once, as seeds = [...] or in [grid]")
        seeds = grid_seeds[0]
        file_grid = [(name, values) for name, values in file_grid if name != ("seed",)]
    if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds) or not seeds:
        raise ConfigError(f"{path}: seeds must be a non-empty list of integers, got {seeds!r}")
    rows_spec = spec.get("rows")
    if rows_spec is None and "grid" in spec:
        rows_spec = [{"label": ""}]  # a grid over the base alone, labelled by its grid values
    if not isinstance(rows_spec, list) or not rows_spec:
        raise ConfigError(f"{path}: needs at least one [[rows]] table or a [grid]")
    base = dict(spec.get("base", {}))
    if "stream" in spec:
        base.setdefault("stream", spec["stream"])
    rows = []
    for index, row_spec in enumerate(rows_spec, start=1):
        where = f"{path} row {index}"
        if "label" not in row_spec:
            raise ConfigError(f"{where}: every row needs a label")
        row_grid = _grid_dimensions(row_spec.get("grid", {}), f"{where} grid")
        claim = row_spec.get("claim")
        if claim is not None and claim not in CLAIMS:
            raise ConfigError(
                f"{where}: claim must be one of {list(CLAIMS)} (the paper's direction against "
                f"the reference row), got {claim!r}"
            )
        if any(name == ("seed",) for name, _ in row_grid):
            raise ConfigError(f"{where}: seeds are the file's; list them in seeds = [...]")
        # The row's own grid replaces the file's for a setting both list.
        dimensions = {name: values for name, values in file_grid}
        dimensions.update(row_grid)
        choices = [[(name, value) for value in values] for name, values in dimensions.items()]
        for point in itertools.product(*choices):
            row_values = _with_grid_point(row_spec, point)
            values = {**base, **row_values}
            for key in MERGED_OPTIONS:
                inherited = base.get(key, {})
                # Another strategy's options mean nothing to this row's strategy.
                if key == "strategy_options" and values.get("strategy") != base.get("strategy"):
                    inherited = {}
                values[key] = {**inherited, **row_values.get(key, {})}
            values.update(overrides or {})
            config = RunConfig.from_mapping(values, where)
            parts = (str(row_spec["label"]), _point_label(point))
            label = " ".join(part for part in parts if part) or config.strategy
            grid_point = {".".join(name): value for name, value in point}
            rows.append(ExperimentRow(label, config, row_spec.get("paper"), grid_point, claim))
    labels = [row.label for row in rows]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{path}: row labels must be unique, got {labels}")
    reference = spec.get("reference")
    if reference is not None and not isinstance(reference, str):
        raise ConfigError(f"{path}: reference must be a row label (text), got {reference!r}")
    headroom = spec.get("headroom", True)
    if not isinstance(headroom, bool):
        raise ConfigError(f"{path}: headroom must be true or false, got {headroom!r}")
    return Experiment(
        str(spec.get("title", Path(path).stem)),
        seeds,
        rows,
        Path(path),
        reference=reference,
        headroom=headroom,
    )


def with_headroom_rows(experiment: Experiment, base_overrides: dict[str, Any]) -> Experiment:
    """The experiment with a ``zeroshot`` and a ``joint`` row (the file's base settings, that
    strategy, no strategy options) for each of those strategies no row has yet."""
    if not experiment.headroom:
        return experiment
    spec = tomllib.loads(experiment.source.read_text())
    base = dict(spec.get("base", {}))
    if "stream" in spec:
        base.setdefault("stream", spec["stream"])
    present = {row.config.strategy for row in experiment.rows}
    labels = {row.label for row in experiment.rows}
    added = []
    for strategy in HEADROOM_STRATEGIES:
        if strategy in present or strategy in labels:
            continue
        values = {**base, **base_overrides, "strategy": strategy, "strategy_options": {}}
        config = RunConfig.from_mapping(values, f"{experiment.source} [base]")
        added.append(ExperimentRow(strategy, config))
    return replace(experiment, rows=[*experiment.rows, *added])


def _statistics(outcomes: list[RunOutcome]) -> SeedStatistics:
    return SeedStatistics.of([o.result for o in outcomes if o.result is not None])


def _failed(outcomes: list[RunOutcome]) -> list[RunOutcome]:
    return [o for o in outcomes if o.status == "failed"]


def _seeds_cell(stats: SeedStatistics, failed: list[RunOutcome]) -> str:
    return f"{len(stats.seeds)}" + (f" ({len(failed)} failed)" if failed else "")


def markdown_table(
    experiment: Experiment,
    outcomes: dict[str, list[RunOutcome]],
    command: str = "cmmm experiment",
) -> str:
    has_paper = any(row.paper for row in experiment.rows)
    held_out = any(_statistics(found).held_out_aa for found in outcomes.values())
    valid = any(_statistics(found).valid_aa for found in outcomes.values())
    header = ["configuration", "AA (%)", "FM", "trainable", "time/run (s)", "seeds"]
    if held_out:
        header[3:3] = ["AA held-out (%)", "held-out cases"]
    if valid:
        header.insert(3, "AA valid (%)")
    reference = experiment.reference_label()
    # Once per row: the paired column and the note on unpaired seeds read the same statistics.
    row_stats = {row.label: _statistics(outcomes[row.label]) for row in experiment.rows}
    differences = paired_differences(row_stats, reference)
    if differences:
        header.insert(header.index("trainable"), f"AA − {reference} (paired)")
    if has_paper:
        header.append("paper AA / FM")
    verdicts = row_verdicts(experiment, differences)
    if verdicts:
        header.append("verdict (paper's direction)")
    resolved = [complete(row.config) for row in experiment.rows]
    streams = {config.stream for config in resolved}
    epochs = {config.epochs for config in resolved}
    # A grid may vary the stream or the epochs; then each row's label says which.
    stream = f"Stream `{streams.pop()}`" if len(streams) == 1 else "Streams as labelled"
    per_task = f"{epochs.pop()} epochs per task" if len(epochs) == 1 else "epochs as labelled"
    lines = [
        f"### {experiment.title}",
        "",
        f"{stream}, {per_task}; mean ± half-width of the 95 % confidence interval (Student t) "
        f"over seeds {experiment.seeds}. Produced by `{command} {experiment.source}`.",
        "",
        "| " + " | ".join(header) + " |",
        "|---" + "|---:" * (len(header) - 1) + "|",
    ]
    failures: list[str] = []
    for row in experiment.rows:
        stats, failed = _statistics(outcomes[row.label]), _failed(outcomes[row.label])
        wall = stats.wall_mean
        difference = []
        if differences:
            found = differences.get(row.label)
            difference = ["reference" if row.label == reference else difference_cell(found)]
        cells = [
            row.label,
            stats.cell("aa"),
            stats.cell("fm"),
            *([stats.cell("valid_aa")] if valid else []),
            *([stats.cell("held_out_aa"), stats.held_out_per_case()] if held_out else []),
            *difference,
            "-" if stats.trainable is None else f"{stats.trainable:,}",
            "-" if wall is None else f"{wall:.0f}",
            _seeds_cell(stats, failed),
        ]
        if has_paper:
            cells.append(row.paper or "")
        if verdicts:
            claim, found = verdicts.get(row.label, ("", ""))
            cells.append("reference" if row.label == reference else found and f"{found} ({claim})")
        lines.append("| " + " | ".join(cells) + " |")
        failures += [f"- {row.label} seed {o.seed}: {o.error}" for o in failed]
    if differences:
        lines += ["", significance_footer(differences, reference or "")]
        if note := unpaired_note(row_stats, reference):
            lines += ["", note]
    if verdicts:
        found_verdicts = {label: found for label, (_, found) in verdicts.items()}
        lines += ["", verdict_footer(found_verdicts, reference or "")]
    chosen = chosen_on_validation(experiment, outcomes)
    if chosen is not None:
        lines += [
            "",
            f"Chosen on validation: **{chosen}** (highest mean AA on the tasks' validation "
            "splits, over the seeds every compared row finished, among the rows other than "
            "the zeroshot and joint headroom rows; test numbers choose nothing).",
        ]
    if failures:
        lines += ["", "Failed runs:", "", *failures]
    return "\n".join(lines) + "\n"


def chosen_on_validation(
    experiment: Experiment, outcomes: dict[str, list[RunOutcome]]
) -> str | None:
    """The row a user should pick: the highest mean validation AA over the seeds every
    candidate recorded (so rows compare on the same seeds), headroom rows aside; None when no
    seed is common to the rows that recorded validation AA."""
    by_seed = {
        row.label: stats.valid_aa_by_seed
        for row in experiment.rows
        if row.config.strategy not in HEADROOM_STRATEGIES
        and (stats := _statistics(outcomes[row.label])).valid_aa_by_seed
    }
    if not by_seed:
        return None
    common = set.intersection(*(set(values) for values in by_seed.values()))
    if not common:
        return None
    means = {
        label: statistics.fmean(values[s] for s in common) for label, values in by_seed.items()
    }
    return max(means, key=means.__getitem__)


def row_differences(
    experiment: Experiment, outcomes: dict[str, list[RunOutcome]]
) -> dict[str, Any]:
    """Row label -> paired AA difference to the reference row (None for the reference itself
    or without pairs); empty when there is no reference row with finished runs."""
    rows = {row.label: _statistics(outcomes[row.label]) for row in experiment.rows}
    return paired_differences(rows, experiment.reference_label())


def paper_claims(experiment: Experiment) -> dict[str, str]:
    """Row label -> the paper's direction against the reference row ("above" or "below"): the
    row's ``claim``, else its paper AA against the reference row's (none when they are equal
    or either is missing)."""
    reference = experiment.reference_label()
    rows = {row.label: row for row in experiment.rows}
    reference_aa = rows[reference].paper_aa() if reference is not None else None
    claims = {}
    for row in experiment.rows:
        if reference is None or row.label == reference:
            continue
        row_aa = row.paper_aa()
        if row.claim is not None:
            claims[row.label] = row.claim
        elif row_aa is not None and reference_aa is not None and row_aa != reference_aa:
            claims[row.label] = "above" if row_aa > reference_aa else "below"
    return claims


def row_verdicts(experiment: Experiment, differences: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Row label -> (the paper's direction, its verdict), for the rows with a claim; empty
    without a reference row with finished runs."""
    if not differences:
        return {}
    return {
        label: (claim, verdict(differences.get(label), claim))
        for label, claim in paper_claims(experiment).items()
    }


def experiment_figure(experiment: Experiment, outcomes: dict[str, list[RunOutcome]]) -> Figure:
    """AA and FM per row (mean ± 95 % CI over seeds, each seed a dot), in the file's order."""
    from cmmm.plotting import RunGroup, comparison_figure

    groups = [
        RunGroup(row.label, found)
        for row in experiment.rows
        if (found := [o.result for o in outcomes[row.label] if o.result is not None])
    ]
    if not groups:
        raise ConfigError(f"{experiment.source}: no row has a finished run to plot")
    return comparison_figure(
        groups,
        f"{experiment.title}: mean ± 95 % CI over seeds {experiment.seeds}; grey dots: seeds",
    )


CSV_METRICS = [
    "aa_mean",
    "aa_std",
    "aa_ci95",
    "fm_mean",
    "fm_std",
    "fm_ci95",
    "held_out_aa_mean",
    "held_out_aa_std",
    "trainable",
    "wall_seconds_mean",
    "aa_diff_vs_reference",
    "aa_diff_ci95",
    "aa_diff_significant",
    "paper_claim",
    "verdict",
]


def csv_table(experiment: Experiment, outcomes: dict[str, list[RunOutcome]]) -> str:
    """One line per row: its label, its grid values (one column each) and its metrics."""
    grid_columns: list[str] = []
    for row in experiment.rows:
        grid_columns += [name for name in row.grid_point if name not in grid_columns]
    fieldnames = ["configuration", *grid_columns, *CSV_METRICS, "seeds", "failed_seeds"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames, lineterminator="\n", restval="")
    writer.writeheader()
    differences = row_differences(experiment, outcomes)
    # The paper's claims are listed even before the reference row has finished runs.
    claims, verdicts = paper_claims(experiment), row_verdicts(experiment, differences)
    for row in experiment.rows:
        stats, failed = _statistics(outcomes[row.label]), _failed(outcomes[row.label])
        record: dict[str, Any] = {
            "configuration": row.label,
            "paper_claim": claims.get(row.label),
            "verdict": verdicts.get(row.label, (None, None))[1],
        }
        found = differences.get(row.label)
        if found is not None:
            record.update(
                aa_diff_vs_reference=found[0].mean,
                aa_diff_ci95=found[0].half_width,
                aa_diff_significant=found[0].excludes_zero,
            )
        record.update({name: _csv_value(value) for name, value in row.grid_point.items()})
        values = stats.csv_values()
        record.update({name: values[name] for name in CSV_METRICS if name in values})
        record.update(
            seeds=" ".join(map(str, stats.seeds)),
            failed_seeds=" ".join(str(o.seed) for o in failed),
        )
        writer.writerow({k: "" if v is None else v for k, v in record.items()})
    return buffer.getvalue()


def _csv_value(value: Any) -> Any:
    return value if isinstance(value, str | int | float) else json.dumps(value)


def write_tables(
    experiment: Experiment,
    outcomes: dict[str, list[RunOutcome]],
    out: Path,
    command: str = "cmmm experiment",
) -> tuple[str, Path, Path]:
    """Write ``OUT/<file stem>.md`` and ``.csv``; return the Markdown and both paths."""
    table = markdown_table(experiment, outcomes, command)
    markdown_path = Path(out) / f"{experiment.source.stem}.md"
    csv_path = Path(out) / f"{experiment.source.stem}.csv"
    atomic_write_text(markdown_path, table)
    atomic_write_text(csv_path, csv_table(experiment, outcomes))
    return table, markdown_path, csv_path


def strategies_experiment(
    base: RunConfig, strategies: Sequence[str], seeds: Sequence[int]
) -> Experiment:
    """The experiment ``cmmm compare`` runs: one row per strategy (labelled by its name) made of
    ``base`` with that strategy, every row over ``seeds``."""
    rows = [ExperimentRow(strategy, replace(base, strategy=strategy)) for strategy in strategies]
    # No file behind it: the source only names its tables, as compare-<stream>.
    return Experiment(
        f"{base.stream}: continual-learning comparison",
        list(seeds),
        rows,
        Path(f"compare-{base.stream}"),
        headroom=False,
    )


def collect_outcomes(
    experiment: Experiment, log: Callable[[str], None] = print, run_missing: bool = True
) -> dict[str, list[RunOutcome]]:
    """Run or reuse every (row, seed) in this process, one after another (``cmmm sweep`` runs
    the same plan on Ray, ``cmmm.sweeping``): row label -> one outcome per seed.

    Every run is planned (resolved) before the first starts, so a bad row fails at once.
    ``run_missing`` False runs nothing and reports the unfinished runs as ``missing``.
    """
    outcomes: dict[str, list[RunOutcome]] = {row.label: [] for row in experiment.rows}
    planned = experiment.planned_runs()
    for index, run in enumerate(planned, start=1):
        label = f"[{index}/{len(planned)}] {run.label} seed {run.seed}"
        outcomes[run.label].append(run_or_reuse(run.config, label, log, run_missing=run_missing))
    return outcomes


def run_experiment(
    experiment: Experiment,
    out: Path,
    log: Callable[[str], None] = print,
    figure: Path | None = None,
    finished_only: bool = False,
) -> tuple[str, Path]:
    """Run or reuse every (row, seed); write the tables (and the figure); return the Markdown
    and its path. ``finished_only``: run nothing, tabulate the finished runs."""
    if figure is not None:
        from cmmm.plotting import check_output

        check_output(figure)  # a wrong suffix fails before hours of runs, not after
    outcomes = collect_outcomes(experiment, log, run_missing=not finished_only)
    table, markdown_path, _ = write_tables(experiment, outcomes, out)
    if figure is not None:
        from cmmm.plotting import save_figure

        save_figure(experiment_figure(experiment, outcomes), figure)
        log(f"figure written to {figure}")
    return table, markdown_path
