"""``cmmm compare``: run (or reuse) several strategies over several seeds, then one Table-2 table.

A comparison is an experiment (``cmmm.experiments.strategies_experiment``): one row per
strategy, each the base configuration with that strategy, over the same seeds, planned and run
by the experiments' runner; only its table is its own. When a run's ``run_dir()/results.json``
exists the run is reused, otherwise it is run (continued from its checkpoint if it was
interrupted); a failed run is reported and the others go on. Aggregation over seeds is
``cmmm.summary``'s (the one every table uses); the table gives each row's mean ± the half-width
of its 95 % confidence interval (Student t), and its AA against a reference row as a
paired difference over the seeds both finished (``cmmm.significance``). With a ``zeroshot`` row
the table also says, per task, how far each method ends above the pre-trained backbone.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cmmm.atomic_files import atomic_write_text
from cmmm.errors import ConfigError
from cmmm.experiments import HEADROOM_STRATEGIES, collect_outcomes, strategies_experiment
from cmmm.outcomes import RunOutcome
from cmmm.run_config import RunConfig
from cmmm.significance import difference_cell, paired_difference, significance_footer
from cmmm.summary import (
    Aggregate,
    aggregate,
    mean_spread,
    only_seeds,
    paired_differences,
    unpaired_note,
)

DEFAULT_REFERENCE = "naive"
ZEROSHOT = "zeroshot"


@dataclass
class ComparisonRow:
    """One strategy: its seeds aggregated by ``cmmm.summary``, or nothing if every run failed."""

    strategy: str
    buffer: int | None
    aggregate: Aggregate | None
    failed_seeds: list[int] = field(default_factory=list)
    missing_seeds: list[int] = field(default_factory=list)

    def markdown_cells(
        self, held_out: bool = False, difference: str | None = None, valid: bool = False
    ) -> list[str]:
        """The row's cells; ``valid`` adds the AA on the validation splits after FM,
        ``held_out`` the AA on held-out patterns after that, and ``difference`` (the paired
        difference to the reference) comes after those."""
        buffer = "-" if self.buffer is None else str(self.buffer)
        failed = f" ({len(self.failed_seeds)} failed)" if self.failed_seeds else ""
        failed += f" ({len(self.missing_seeds)} not run yet)" if self.missing_seeds else ""
        agg = self.aggregate
        if agg is None:
            state = "failed" if self.failed_seeds else "not run yet"
            extra = [state] if valid else []
            extra += [state] if held_out else []
            extra += [] if difference is None else ["n/a"]
            return [self.strategy, buffer, state, state, *extra, "-", "-", f"0{failed}"]
        extra = [agg.cell("valid_aa")] if valid else []
        extra += [agg.cell("held_out_aa")] if held_out else []
        extra += [] if difference is None else [difference]
        return [
            self.strategy,
            buffer,
            agg.cell("aa"),
            agg.cell("fm"),
            *extra,
            f"{agg.trainable:,}",
            f"{agg.wall_mean:.1f}",
            f"{len(agg.seeds)}{failed}",
        ]

    def csv_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "strategy": self.strategy,
            "buffer": "" if self.buffer is None else self.buffer,
            "failed_seeds": " ".join(map(str, self.failed_seeds)),
            "missing_seeds": " ".join(map(str, self.missing_seeds)),
        }
        agg = self.aggregate
        if agg is not None:
            record.update(agg.csv_values(), seeds=" ".join(map(str, agg.seeds)))
        return {name: "" if record.get(name) is None else record[name] for name in CSV_FIELDS}


MARKDOWN_HEADER = ["method", "buffer", "AA (%)", "FM", "trainable", "time/run (s)", "seeds"]
CSV_FIELDS = [
    "strategy",
    "buffer",
    "aa_mean",
    "aa_std",
    "aa_ci95",
    "fm_mean",
    "fm_std",
    "fm_ci95",
    "valid_aa_mean",
    "valid_aa_ci95",
    "held_out_aa_mean",
    "held_out_aa_std",
    "trainable",
    "wall_seconds_mean",
    "seeds",
    "failed_seeds",
    "missing_seeds",
    "reference",
    "aa_diff_vs_reference",
    "aa_diff_ci95",
    "aa_diff_significant",
    "paired_seeds",
]


@dataclass
class Comparison:
    stream: str
    outcomes: list[RunOutcome]
    rows: list[ComparisonRow]
    # Set when the comparison is one of several task orders (``compare_orders``).
    task_order: str | None = None
    # The row every other row's AA is compared with, seed by seed (None: no such column).
    reference: str | None = DEFAULT_REFERENCE

    def differences(self) -> dict[str, Any]:
        """strategy -> its paired AA difference to the reference (None where undefined)."""
        return paired_differences(
            {row.strategy: row.aggregate for row in self.rows}, self.reference
        )

    def markdown(self) -> str:
        seeds = sorted({o.seed for o in self.outcomes})
        epochs = sorted({o.result.config["epochs"] for o in self.outcomes if o.result})
        per_task = f"{', '.join(map(str, epochs))} epochs per task; " if epochs else ""
        lines = [
            f"## {self.stream}: continual-learning comparison",
            "",
            f"AA and FM in %, mean ± half-width of the 95 % confidence interval (Student t) over "
            f"seeds {seeds}; {per_task}time is the mean wall time of one run.",
        ]
        settings = sorted({row.aggregate.settings for row in self.rows if row.aggregate})
        if settings:
            lines += ["", "Settings: " + "; ".join(settings)]
        held_out = any(row.aggregate and row.aggregate.held_out_aa for row in self.rows)
        valid = any(row.aggregate and row.aggregate.valid_aa for row in self.rows)
        header = list(MARKDOWN_HEADER)
        if valid:
            header.insert(header.index("FM") + 1, "AA valid (%)")
            lines += [
                "",
                "AA valid: the same AA on every task's validation split, the number to choose "
                "options by (test numbers are for reporting only).",
            ]
        if held_out:
            header.insert(header.index("FM") + 1, "AA held-out (%)")
            lines += ["", "AA held-out: accuracy on the missing cases no task trained on."]
        differences = self.differences()
        if differences:
            header.insert(header.index("trainable"), f"AA − {self.reference} (paired)")
        lines += [
            "",
            "| " + " | ".join(header) + " |",
            "|---|" + "---:|" * (len(header) - 1),
        ]
        for row in self.rows:
            difference = None
            if differences:
                difference = (
                    "reference"
                    if row.strategy == self.reference
                    else (difference_cell(differences.get(row.strategy)))
                )
            cells = row.markdown_cells(held_out, difference, valid)
            lines.append("| " + " | ".join(cells) + " |")
        if differences:
            lines += ["", significance_footer(differences, self.reference or "")]
            aggregates = {row.strategy: row.aggregate for row in self.rows}
            if note := unpaired_note(aggregates, self.reference):
                lines += ["", note]
        elif self.reference is not None:
            lines += [
                "",
                f"No paired differences: the reference {self.reference} has no runs here.",
            ]
        lines += self.above_zeroshot_markdown()
        walls = [o.result.wall_time_seconds for o in self.outcomes if o.result is not None]
        if walls:
            # Summed from each results.json, so reused runs count with the time they took then.
            lines += [
                "",
                f"Total wall time of the {len(walls)} runs: {sum(walls) / 3600:.2f} h "
                f"({sum(walls):,.0f} s, one run after another).",
            ]
        failures = [o for o in self.outcomes if o.status == "failed"]
        if failures:
            lines += ["", "Failed runs:", ""]
            lines += [f"- {o.strategy} seed {o.seed}: {o.error}" for o in failures]
        missing = [o for o in self.outcomes if o.status == "missing"]
        if missing:
            lines += [
                "",
                f"Not run yet ({len(missing)} runs; the same command without --finished-only "
                "runs them): " + ", ".join(f"{o.strategy} seed {o.seed}" for o in missing) + ".",
            ]
        return "\n".join(lines) + "\n"

    def above_zeroshot(self) -> tuple[list[str], dict[str, dict[str, Any]]]:
        """Task codes, and per strategy and code: the paired final-accuracy difference to the
        zeroshot row over the seeds both finished (interval, seeds) or None."""
        finals = {
            row.strategy: _final_accuracies(
                [o for o in self.outcomes if o.strategy == row.strategy and o.result]
            )
            for row in self.rows
        }
        reference = finals.get(ZEROSHOT) or {}
        codes = [code for code in reference]
        table: dict[str, dict[str, Any]] = {}
        if not codes:
            return [], {}
        aggregates = {row.strategy: row.aggregate for row in self.rows}
        zeroshot = aggregates.get(ZEROSHOT)
        for strategy, by_code in finals.items():
            if strategy == ZEROSHOT:
                continue
            found = aggregates.get(strategy)
            # Seeds that started from another backbone than zeroshot's do not pair.
            seeds = found.pairable_seeds(zeroshot) if found and zeroshot else set()
            table[strategy] = {
                code: paired_difference(only_seeds(by_code.get(code, {}), seeds), reference[code])
                for code in codes
            }
        return codes, table

    def above_zeroshot_markdown(self) -> list[str]:
        codes, table = self.above_zeroshot()
        if not table:
            return []
        lines = [
            "",
            "### Above zero-shot, per task",
            "",
            "Final accuracy on each task (missing case, by its present views) minus the "
            "pre-trained backbone's (zeroshot), in percentage points, mean over the seeds both "
            "finished; the last column is AA's.",
            "",
            "| method | " + " | ".join(codes) + " | AA |",
            "|---|" + "---:|" * (len(codes) + 1),
        ]
        for strategy, by_code in table.items():
            cells = [_signed_mean(by_code[code]) for code in codes]
            aa = [d[0].mean for d in by_code.values() if d is not None]
            mean_aa = f"{statistics.fmean(aa):+.2f}" if len(aa) == len(codes) else "n/a"
            lines.append(f"| {strategy} | " + " | ".join(cells) + f" | {mean_aa} |")
        return lines

    def above_zeroshot_csv(self) -> str:
        codes, table = self.above_zeroshot()
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["strategy", "task", "above_zeroshot_mean", "ci95", "paired_seeds"])
        for strategy, by_code in table.items():
            for code in codes:
                found = by_code[code]
                if found is None:
                    writer.writerow([strategy, code, "", "", ""])
                    continue
                interval, seeds = found
                half = "" if interval.half_width is None else interval.half_width
                writer.writerow([strategy, code, interval.mean, half, " ".join(map(str, seeds))])
        return buffer.getvalue()

    def csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        differences = self.differences()
        for row in self.rows:
            record = row.csv_record()
            found = differences.get(row.strategy)
            if differences:
                record["reference"] = self.reference
            if found is not None:
                interval, seeds = found
                half = interval.half_width
                record.update(
                    aa_diff_vs_reference=interval.mean,
                    aa_diff_ci95="" if half is None else half,
                    aa_diff_significant=interval.excludes_zero,
                    paired_seeds=" ".join(map(str, seeds)),
                )
            writer.writerow(record)
        return buffer.getvalue()

    def write(self, out: Path) -> tuple[Path, Path]:
        """``compare-<stream>.md`` and ``.csv`` (returned), and with a zeroshot row
        ``compare-<stream>-above-zeroshot.csv``."""
        markdown_path = out / f"compare-{self.stream}.md"
        csv_path = out / f"compare-{self.stream}.csv"
        atomic_write_text(markdown_path, self.markdown())
        atomic_write_text(csv_path, self.csv())
        if self.above_zeroshot()[1]:
            atomic_write_text(
                out / f"compare-{self.stream}-above-zeroshot.csv", self.above_zeroshot_csv()
            )
        return markdown_path, csv_path


def _final_accuracies(outcomes: list[RunOutcome]) -> dict[str, dict[int, float]]:
    """task code -> seed -> final accuracy on that task, from each run's ``per_task_final``."""
    by_code: dict[str, dict[int, float]] = {}
    for outcome in outcomes:
        if outcome.result is not None:
            for code, accuracy in outcome.result.final_accuracies().items():
                by_code.setdefault(code, {})[outcome.seed] = accuracy
    return by_code


def _signed_mean(found: Any) -> str:
    return "n/a" if found is None else f"{found[0].mean:+.2f}"


def with_headroom(strategies: Sequence[str], reference: str | None) -> list[str]:
    """``strategies`` with the reference, ``zeroshot`` and ``joint`` added at the end when
    missing (what every comparison shows unless ``--no-headroom``)."""
    names = list(strategies)
    extra = [reference] if reference else []
    for name in [*extra, *HEADROOM_STRATEGIES]:
        if name not in names:
            names.append(name)
    return names


def expand_strategies(spec: str | Sequence[str], stream: str) -> list[str]:
    """Strategy names from ``a,b,...``; ``all`` is every registered strategy.

    A replay family name (``er``, ``agem``, ``icarl``, ``der``) stands for its two paper buffer
    sizes on the stream (see ``cmmm.replay_sizes.expand_family``); ``all`` lists each family at
    those two sizes too, not at every registered size. Unknown names raise ``ConfigError``.
    """
    from cmmm.replay_sizes import SIZED_FAMILIES, expand_family
    from cmmm.strategy import STRATEGIES

    requested = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    requested = [s for s in requested if s]
    if not requested:
        raise ConfigError("--strategies names no strategy")
    if "all" in requested:
        sized = {f"{family}-" for family in SIZED_FAMILIES}
        plain = [n for n in STRATEGIES.names() if not any(n.startswith(p) for p in sized)]
        requested = plain + sorted(SIZED_FAMILIES)
    names: list[str] = []
    for name in requested:
        for expanded in expand_family(name, stream):
            STRATEGIES.get(expanded)  # ConfigError listing the valid names
            if expanded not in names:
                names.append(expanded)
    return names


def compare(
    base: RunConfig,
    strategies: Sequence[str],
    seeds: Sequence[int],
    log: Callable[[str], None] = print,
    finished_only: bool = False,
    reference: str | None = DEFAULT_REFERENCE,
) -> Comparison:
    """Run or reuse every (strategy, seed) pair and aggregate them, one row per strategy.

    ``finished_only`` runs nothing: the table is made of the finished runs and lists the others.
    ``reference``: the row the others' AA is compared with, seed by seed (if it is a row).
    """
    # A comparison is an experiment of one row per strategy, run by the experiments' runner;
    # only its table is its own.
    if not seeds:
        raise ConfigError("--seeds must be >= 1")
    experiment = strategies_experiment(base, strategies, seeds)
    by_row = collect_outcomes(experiment, log, run_missing=not finished_only)
    outcomes = [outcome for row in experiment.rows for outcome in by_row[row.label]]
    return Comparison(
        stream=base.stream,
        outcomes=outcomes,
        rows=_rows(strategies, outcomes),
        reference=reference,
    )


def _rows(strategies: Sequence[str], outcomes: list[RunOutcome]) -> list[ComparisonRow]:
    rows = []
    for strategy in strategies:
        mine = [o for o in outcomes if o.strategy == strategy]
        results = [o.result for o in mine if o.result is not None]
        groups = aggregate(results)
        if len(groups) > 1:  # cannot happen: only strategy and seed vary
            raise ConfigError(f"{strategy}: runs with different settings in one comparison")
        rows.append(
            ComparisonRow(
                strategy=strategy,
                buffer=results[0].strategy.buffer if results else None,
                aggregate=groups[0] if groups else None,
                failed_seeds=[o.seed for o in mine if o.status == "failed"],
                missing_seeds=[o.seed for o in mine if o.status == "missing"],
            )
        )
    return rows


# --------------------------------------------------------------------------------------------
# Task-order robustness: the same comparison under K random task orders
# --------------------------------------------------------------------------------------------


def random_task_orders(count: int, num_tasks: int, order_seed: int = 0) -> list[str]:
    """``count`` distinct random permutations of the tasks, as ``--task-order`` index lists.

    Drawn from their own generator (``order_seed``), so the orders do not depend on the run
    seeds and a larger ``count`` extends a smaller one's list.
    """
    if count < 1:
        raise ConfigError(f"--orders must be >= 1, got {count}")
    if num_tasks < 1:
        raise ConfigError(f"a stream needs at least one task, got {num_tasks}")
    possible = math.factorial(num_tasks)
    if count > possible:
        raise ConfigError(f"--orders {count}: {num_tasks} tasks have only {possible} orders")
    rng = np.random.default_rng(order_seed)
    orders: list[str] = []
    while len(orders) < count:
        order = ",".join(str(i + 1) for i in rng.permutation(num_tasks))
        if order not in orders:
            orders.append(order)
    return orders


@dataclass
class OrderRow:
    """One strategy over several task orders: per order the mean over its seeds."""

    strategy: str
    aa_by_order: list[float]
    fm_by_order: list[float]
    failed: int

    def cells(self) -> list[str]:
        def worst_best(values: list[float], worst: Callable[..., float]) -> str:
            return f"{worst(values):.2f}" if values else "n/a"

        return [
            self.strategy,
            mean_spread(self.aa_by_order),
            mean_spread(self.fm_by_order),
            worst_best(self.aa_by_order, min),
            worst_best(self.fm_by_order, max),
            str(len(self.aa_by_order)) + (f" ({self.failed} runs failed)" if self.failed else ""),
        ]


@dataclass
class OrderComparison:
    stream: str
    orders: list[str]
    seeds: list[int]
    comparisons: list[Comparison]
    rows: list[OrderRow]
    # The default order's task codes, so that an order reads as patterns ("at > t > av ...").
    task_codes: list[str] | None = None

    def described_order(self, order: str) -> str:
        if not self.task_codes:
            return f"`{order}`"
        codes = " > ".join(self.task_codes[int(i) - 1] for i in order.split(","))
        return f"`{order}` ({codes})"

    def markdown(self) -> str:
        header = ["method", "AA (%)", "FM", "worst AA", "worst FM", "orders"]
        lines = [
            f"## {self.stream}: robustness to the task order",
            "",
            f"{len(self.orders)} random task orders, seeds {self.seeds} in each. Per order the "
            "mean over its seeds; the table gives mean ± sample standard deviation of those "
            "per-order means across orders, and the worst order.",
            "",
            "Orders (1-based indices into the default order): "
            + "; ".join(self.described_order(o) for o in self.orders),
            "",
            "| " + " | ".join(header) + " |",
            "|---" + "|---:" * (len(header) - 1) + "|",
        ]
        lines += ["| " + " | ".join(row.cells()) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["strategy", "order", "aa_seed_mean", "fm_seed_mean", "seeds"])
        for comparison in self.comparisons:
            for row in comparison.rows:
                agg = row.aggregate
                if agg is None:
                    continue
                fm = agg.mean("fm")
                order = comparison.task_order or ""
                seeds = " ".join(map(str, agg.seeds))
                writer.writerow(
                    [row.strategy, order, agg.mean("aa"), "" if fm is None else fm, seeds]
                )
        return buffer.getvalue()

    def write(self, out: Path) -> tuple[Path, Path]:
        stem = f"compare-{self.stream}-orders{len(self.orders)}"
        markdown_path, csv_path = out / f"{stem}.md", out / f"{stem}.csv"
        atomic_write_text(markdown_path, self.markdown())
        atomic_write_text(csv_path, self.csv())
        return markdown_path, csv_path


def compare_orders(
    base: RunConfig,
    strategies: Sequence[str],
    seeds: Sequence[int],
    orders: Sequence[str],
    log: Callable[[str], None] = print,
    finished_only: bool = False,
    task_codes: Sequence[str] | None = None,
) -> OrderComparison:
    """``compare`` once per task order (runs reused by key as always), then across orders.

    ``task_codes``: the default order's task codes, only to name the orders in the table.
    """
    comparisons = []
    for index, order in enumerate(orders, start=1):
        log(f"task order {index}/{len(orders)}: {order}")
        comparison = compare(
            replace(base, task_order=order), strategies, seeds, log, finished_only=finished_only
        )
        comparison.task_order = order
        comparisons.append(comparison)
    rows = []
    for strategy in strategies:
        aa, fm, failed = [], [], 0
        for comparison in comparisons:
            [row] = [r for r in comparison.rows if r.strategy == strategy]
            failed += len(row.failed_seeds)
            # Per order the mean over its seeds, as every table aggregates a row.
            if row.aggregate is not None and (row_aa := row.aggregate.mean("aa")) is not None:
                aa.append(row_aa)
            if row.aggregate is not None and (row_fm := row.aggregate.mean("fm")) is not None:
                fm.append(row_fm)
        rows.append(OrderRow(strategy, aa, fm, failed))
    codes = list(task_codes) if task_codes is not None else None
    return OrderComparison(base.stream, list(orders), list(seeds), comparisons, rows, codes)
