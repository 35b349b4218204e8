"""Aggregate finished runs: mean and spread of AA, FM and BWT over seeds, per configuration."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cmmm.results import ADDED_SETTINGS, Results


def mean_spread(values: Sequence[float]) -> str:
    """``"mean ± sample std"``; one value as is; ``"n/a"`` when there is none."""
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


@dataclass(frozen=True)
class Aggregate:
    stream: str
    strategy: str
    settings: str
    seeds: list[int]
    aa: list[float]
    fm: list[float]
    bwt: list[float]
    wall_seconds: list[float]
    trainable: int
    # AA on the held-out patterns (``--eval-patterns``) of the seeds that have them.
    held_out_aa: list[float] = field(default_factory=list)
    # AA on the tasks' validation splits, of the seeds that recorded it: what to choose on.
    valid_aa: list[float] = field(default_factory=list)

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
        rows.append(
            Aggregate(
                stream=stream,
                strategy=strategy,
                settings=settings,
                seeds=[r.seed for r in members],
                aa=[r.aa for r in members if r.aa is not None],
                fm=[r.fm for r in members if r.fm is not None],
                bwt=[r.bwt for r in members if r.bwt is not None],
                wall_seconds=[r.wall_time_seconds for r in members],
                trainable=members[0].parameters.trainable,
                held_out_aa=[
                    r.held_out.aa for r in members if r.held_out and r.held_out.aa is not None
                ],
                valid_aa=[r.valid.aa for r in members if r.valid and r.valid.aa is not None],
            )
        )
    return rows


def markdown_table(rows: list[Aggregate]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row.row()) + " |" for row in rows]
    return "\n".join(lines)
