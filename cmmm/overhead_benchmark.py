"""How much does training through Avalanche cost over a plain PyTorch loop?

Both sides train the same pre-trained MulT (same initial weights) with Adam on the same tasks in
the same order, one optimizer whose state carries over between tasks (as Avalanche's ``Naive``
does), the same batch size and epochs, and no evaluation. The only difference is the loop:
Avalanche's ``Naive`` strategy over the benchmark's experiences versus
``plain_training.train_epoch`` over in-memory tensors.

The two loops alternate for ``rounds`` rounds (which goes first alternates too), each round
from a fresh copy of the same weights; the table gives min and median per loop and the ratio of
the medians, with the range of the per-round ratios, because one timing on a shared machine
says little.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from rich.table import Table

from cmmm.errors import ConfigError
from cmmm.optimizers import adam
from cmmm.plain_training import train_epoch
from cmmm.pretraining import task_criterion
from cmmm.run_config import RunConfig, complete
from cmmm.running import prepare, seed_everything
from cmmm.strategy import STRATEGIES


@dataclass(frozen=True)
class LoopTiming:
    name: str
    rounds: tuple[float, ...]  # seconds of each round
    samples: int  # per round

    @property
    def seconds(self) -> float:
        """Median over rounds."""
        return statistics.median(self.rounds)

    @property
    def fastest(self) -> float:
        return min(self.rounds)

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds


@dataclass(frozen=True)
class OverheadReport:
    stream: str
    source: str
    tasks: int
    epochs: int
    batch_size: int
    device: str
    threads: int
    framework: LoopTiming
    plain: LoopTiming

    @property
    def ratio(self) -> float:
        """Median Avalanche time over median plain time."""
        return self.framework.seconds / self.plain.seconds

    @property
    def round_ratios(self) -> list[float]:
        return [f / p for f, p in zip(self.framework.rounds, self.plain.rounds, strict=True)]

    def table(self) -> Table:
        ratios = self.round_ratios
        table = Table(
            title=f"naive on {self.stream} ({self.tasks} tasks x {self.epochs} epochs, batch "
            f"{self.batch_size}, {self.device}, {self.threads} threads, "
            f"{len(ratios)} alternated rounds)",
            caption=f"data: {self.source}. Overhead ratio (Avalanche / plain, medians): "
            f"{self.ratio:.2f}; per round {min(ratios):.2f} to {max(ratios):.2f}",
        )
        for column in ("loop", "min (s)", "median (s)", "samples/s", "time vs plain"):
            table.add_column(column, justify="right" if column != "loop" else "left")
        for timing in (self.framework, self.plain):
            table.add_row(
                timing.name,
                f"{timing.fastest:.1f}",
                f"{timing.seconds:.1f}",
                f"{timing.samples_per_second:,.0f}",
                f"{timing.seconds / self.plain.seconds:.2f}x",
            )
        return table


def measure_overhead(
    config: RunConfig, log: Callable[[str], None] = print, rounds: int = 3
) -> OverheadReport:
    """Time both loops for ``config`` (its strategy is ignored: the benchmark is ``naive``),
    alternated over ``rounds`` rounds."""
    if not 1 <= rounds <= 100:
        raise ConfigError(f"--rounds must be between 1 and 100, got {rounds}")
    config = complete(config)
    epochs, batch_size, seed = config.epochs or 1, config.batch_size, config.seed
    prepared = prepare(config, log)
    missing_stream, backbone, device = prepared.stream, prepared.backbone, prepared.device
    dataset = missing_stream.dataset
    criterion = task_criterion(dataset)
    samples = epochs * sum(len(task.train) for task in missing_stream.tasks)
    tasks = len(missing_stream.tasks)

    def plain_loop() -> float:
        model = copy.deepcopy(backbone)
        seed_everything(seed)
        generator = torch.Generator().manual_seed(seed)
        tick = time.perf_counter()
        optimizer = adam(model.parameters(), config.lr)
        for task in missing_stream.tasks:
            x, y = (t.to(device) for t in task.train.tensors())
            for _ in range(epochs):
                train_epoch(model, x, y, criterion, optimizer, batch_size, generator)
        return time.perf_counter() - tick

    def framework_loop() -> float:
        seed_everything(seed)
        ctx = prepared.strategy_context(config, plugins=[])
        ctx.model = copy.deepcopy(backbone)
        template = STRATEGIES.get("naive").factory().build(ctx)
        benchmark = missing_stream.avalanche_benchmark()
        tick = time.perf_counter()
        for experience in benchmark.train_stream:
            template.train(experience)
        return time.perf_counter() - tick

    timings: dict[str, list[float]] = {"plain": [], "framework": []}
    for index in range(rounds):
        order = ("plain", "framework") if index % 2 == 0 else ("framework", "plain")
        for name in order:
            log(f"round {index + 1}/{rounds}: {name} loop, {tasks} tasks x {epochs} epochs")
            timings[name].append(plain_loop() if name == "plain" else framework_loop())
    return OverheadReport(
        stream=config.stream,
        source=dataset.source or dataset.name,
        tasks=tasks,
        epochs=epochs,
        batch_size=batch_size,
        device=str(device),
        threads=torch.get_num_threads(),
        framework=LoopTiming("Avalanche Naive", tuple(timings["framework"]), samples),
        plain=LoopTiming("plain PyTorch loop", tuple(timings["plain"]), samples),
    )
