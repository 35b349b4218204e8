"""Aggregate finished runs over seeds: ``SeedStatistics``, the one per-row aggregator every
table uses, and ``aggregate``, which groups runs by configuration for ``cmmm summarize``."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from cmmm.results import BackboneIdentity, Results
from cmmm.run_config import ADDED_SETTINGS
from cmmm.significance import Interval, half_width, interval_cell, paired_difference


def mean_spread(values: Sequence[float]) -> str:
    """``"mean ± sample std"``; one value as is; ``"n/a"`` when there is none."""
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


# The metrics a table gives per row, each a list over the row's seeds (``SeedStatistics``).
METRICS = ("aa", "fm", "bwt", "held_out_aa", "valid_aa")


@dataclass(frozen=True)
class SeedStatistics:
    """One row's finished runs over seeds: what every table (``cmmm compare``, ``cmmm
    experiment``, ``cmmm sweep``, ``cmmm summarize``) says about a row.

    The means, spreads and 95 % intervals are ``cmmm.significance``'s; ``paired_differences``
    compares rows with a reference row seed by seed.
    """

    # The seeds of the finished runs, in the order the runs were given.
    seeds: list[int] = field(default_factory=list)
    aa: list[float] = field(default_factory=list)
    fm: list[float] = field(default_factory=list)
    bwt: list[float] = field(default_factory=list)
    wall_seconds: list[float] = field(default_factory=list)
    # The first run's (every seed of a row trains the same parameters); None without runs.
    trainable: int | None = None
    # AA on the held-out patterns (``--eval-patterns``) of the seeds that have them.
    held_out_aa: list[float] = field(default_factory=list)
    # AA on the tasks' validation splits, of the seeds that recorded it: what to choose on.
    valid_aa: list[float] = field(default_factory=list)
    # FM on the validation splits, of the seeds that recorded it.
    valid_fm: list[float] = field(default_factory=list)
    # Each seed's validation AA, what pairs with another configuration's when choosing.
    valid_aa_by_seed: dict[int, float] = field(default_factory=dict)
    # Trainable parameters as a share of the backbone (the first run's); None without runs.
    trainable_share: float | None = None
    # Each seed's AA, what pairs with another row's.
    aa_by_seed: dict[int, float] = field(default_factory=dict)
    # Held-out pattern code -> its final accuracy, one per seed that has it.
    held_out_finals: dict[str, list[float]] = field(default_factory=dict)
    # Each seed's pre-trained backbone: runs pair only when they started from the same one.
    backbone_by_seed: dict[int, BackboneIdentity] = field(default_factory=dict)

    @classmethod
    def of(cls, results: Sequence[Results], **extra: Any) -> Self:
        """The statistics of finished runs (``extra``: a subclass's own fields)."""
        held_out_finals: dict[str, list[float]] = {}
        for r in results:
            if r.held_out is None:
                continue
            finals = r.held_out.per_task_final
            for task, final in zip(r.held_out.tasks, finals, strict=True):
                held_out_finals.setdefault(task.code, []).append(final["acc"])
        return cls(
            seeds=[r.seed for r in results],
            aa=[r.aa for r in results if r.aa is not None],
            fm=[r.fm for r in results if r.fm is not None],
            bwt=[r.bwt for r in results if r.bwt is not None],
            wall_seconds=[r.wall_time_seconds for r in results],
            trainable=results[0].parameters.trainable if results else None,
            held_out_aa=[
                r.held_out.aa for r in results if r.held_out and r.held_out.aa is not None
            ],
            valid_aa=[r.valid.aa for r in results if r.valid and r.valid.aa is not None],
            valid_fm=[r.valid.fm for r in results if r.valid and r.valid.fm is not None],
            valid_aa_by_seed={
                r.seed: r.valid.aa for r in results if r.valid and r.valid.aa is not None
            },
            trainable_share=(
                results[0].parameters.trainable_share_of_backbone if results else None
            ),
            aa_by_seed={r.seed: r.aa for r in results if r.aa is not None},
            held_out_finals=held_out_finals,
            backbone_by_seed={r.seed: r.backbone for r in results},
            **extra,
        )

    def pairable_seeds(self, reference: SeedStatistics) -> set[int]:
        """The seeds both rows ran from the same pre-trained backbone: what pairs with
        ``reference``. (The same seed on another machine may have got other weights.)"""
        return {
            seed
            for seed, backbone in self.backbone_by_seed.items()
            if seed in reference.backbone_by_seed
            and backbone.same_as(reference.backbone_by_seed[seed])
        }

    def unpairable_seeds(self, reference: SeedStatistics) -> list[int]:
        """The seeds both rows finished but from different pre-trained backbones."""
        both = set(self.backbone_by_seed) & set(reference.backbone_by_seed)
        return sorted(both - self.pairable_seeds(reference))

    def mean(self, metric: str) -> float | None:
        values = getattr(self, metric)
        return statistics.mean(values) if values else None

    def std(self, metric: str) -> float | None:
        """The sample standard deviation over seeds; None below two seeds."""
        values = getattr(self, metric)
        return statistics.stdev(values) if len(values) > 1 else None

    def ci95(self, metric: str) -> float | None:
        """The half-width of the mean's 95 % interval (Student t); None below two seeds."""
        return half_width(getattr(self, metric))

    def cell(self, metric: str) -> str:
        """``"mean ± 95 % half-width"`` as the tables print it."""
        return interval_cell(getattr(self, metric))

    @property
    def wall_mean(self) -> float | None:
        return statistics.mean(self.wall_seconds) if self.wall_seconds else None

    def held_out_per_case(self) -> str:
        """Final accuracy on each held-out pattern, mean over seeds, e.g. "a 55.0, t 71.2"."""
        return ", ".join(
            f"{code} {statistics.mean(v):.1f}" for code, v in self.held_out_finals.items()
        )

    def csv_values(self) -> dict[str, Any]:
        """The per-row numbers the CSV tables hold (each table writes the columns it has)."""
        values: dict[str, Any] = {}
        for metric in METRICS:
            values.update(
                {
                    f"{metric}_mean": self.mean(metric),
                    f"{metric}_std": self.std(metric),
                    f"{metric}_ci95": self.ci95(metric),
                }
            )
        values.update(trainable=self.trainable, wall_seconds_mean=self.wall_mean)
        return values


def paired_differences(
    rows: Mapping[str, SeedStatistics | None], reference: str | None
) -> dict[str, tuple[Interval, list[int]] | None]:
    """Row -> its AA's paired difference to the ``reference`` row over the seeds both finished
    (None for the reference itself and where no seed pairs); empty when the reference is not a
    row with a finished run."""
    found = rows.get(reference) if reference is not None else None
    if found is None or not found.aa_by_seed:
        return {}
    return {
        label: None
        if label == reference or stats is None
        else paired_difference(
            only_seeds(stats.aa_by_seed, stats.pairable_seeds(found)), found.aa_by_seed
        )
        for label, stats in rows.items()
    }


def only_seeds(by_seed: Mapping[int, float], seeds: set[int]) -> dict[int, float]:
    return {seed: value for seed, value in by_seed.items() if seed in seeds}


def unpaired_note(rows: Mapping[str, SeedStatistics | None], reference: str | None) -> str:
    """A sentence naming the rows' seeds left out of the paired column because they ran from a
    different pre-trained backbone than the reference's run of that seed (e.g. runs made on
    another machine); empty when every seed pairs."""
    found = rows.get(reference) if reference is not None else None
    if found is None:
        return ""
    unpaired = {
        label: seeds
        for label, stats in rows.items()
        if label != reference and stats is not None and (seeds := stats.unpairable_seeds(found))
    }
    if not unpaired:
        return ""
    listed = "; ".join(
        f"{label} seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
        for label, seeds in unpaired.items()
    )
    return (
        f"Not paired with {reference} (their run of the same seed started from a different "
        f"pre-trained backbone, e.g. one made on another machine): {listed}."
    )


@dataclass(frozen=True)
class Aggregate(SeedStatistics):
    """The runs of one configuration (stream, strategy and settings) over seeds."""

    stream: str = ""
    strategy: str = ""
    settings: str = ""

    def row(self) -> list[str]:
        return [
            self.stream,
            self.strategy,
            self.settings,
            ",".join(map(str, self.seeds)),
            mean_spread(self.aa),
            mean_spread(self.fm),
            mean_spread(self.bwt),
            f"{self.trainable:,}",
            f"{statistics.mean(self.wall_seconds):.0f}",
        ]


HEADER = ["stream", "strategy", "settings", "seeds", "AA", "FM", "BWT", "trainable", "time (s)"]


def _settings(config: dict[str, Any]) -> str:
    """What distinguishes a configuration besides stream, strategy and seed."""
    shown = {k: config[k] for k in ("epochs", "task_order", "task_data") if k in config}
    shown.update(
        {k: config[k] for k, v in ADDED_SETTINGS.items() if k in config and config[k] != v}
    )
    for key in ("strategy_options", "stream_options", "backbone_options"):
        if config.get(key):
            shown[key] = config[key]
    return " ".join(f"{k}={v}" for k, v in shown.items())


def aggregate(results: Sequence[Results]) -> list[Aggregate]:
    groups: dict[tuple[str, str, str], list[Results]] = defaultdict(list)
    for result in results:
        config = result.config
        groups[(config["stream"], config["strategy"], _settings(config))].append(result)
    rows = []
    for (stream, strategy, settings), members in sorted(groups.items()):
        members.sort(key=lambda r: r.seed)
        rows.append(Aggregate.of(members, stream=stream, strategy=strategy, settings=settings))
    return rows


def markdown_table(rows: list[Aggregate]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row.row()) + " |" for row in rows]
    return "\n".join(lines)
