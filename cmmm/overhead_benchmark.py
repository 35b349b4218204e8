"""How much does training through Avalanche cost over a plain PyTorch loop?

Both sides train the same pre-trained MulT (same initial weights) with Adam on the same tasks in
the same order, one optimizer whose state carries over between tasks (as Avalanche's ``Naive``
does), the same batch size and epochs, and no evaluation. The only difference is the loop:
Avalanche's ``Naive`` strategy over the benchmark's experiences versus
``plain_training.train_epoch`` over in-memory tensors.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from rich.table import Table

from cmmm.plain_training import train_epoch
from cmmm.pretraining import task_criterion
from cmmm.running import RunConfig, prepare, seed_everything
from strategies.naive import NaiveFineTuning


@dataclass(frozen=True)
class LoopTiming:
    name: str
    seconds: float
    samples: int

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
        return self.framework.seconds / self.plain.seconds

    def table(self) -> Table:
        table = Table(
            title=f"naive on {self.stream} ({self.tasks} tasks x {self.epochs} epochs, batch "
            f"{self.batch_size}, {self.device}, {self.threads} threads)",
            caption=f"data: {self.source}. Overhead ratio (Avalanche / plain): {self.ratio:.2f}",
        )
        for column in ("loop", "wall time (s)", "samples/s", "time vs plain"):
            table.add_column(column, justify="right" if column != "loop" else "left")
        for timing in (self.framework, self.plain):
            table.add_row(
                timing.name,
                f"{timing.seconds:.1f}",
                f"{timing.samples_per_second:,.0f}",
                f"{timing.seconds / self.plain.seconds:.2f}x",
            )
        return table


def measure_overhead(config: RunConfig, log: Callable[[str], None] = print) -> OverheadReport:
    """Time both loops for ``config`` (its strategy is ignored: the benchmark is ``naive``)."""
    config = config.resolved()
    epochs, batch_size, seed = config.epochs or 1, config.batch_size, config.seed
    prepared = prepare(config, log)
    missing_stream, backbone, device = prepared.stream, prepared.backbone, prepared.device
    dataset = missing_stream.dataset
    criterion = task_criterion(dataset)
    samples = epochs * sum(len(task.train) for task in missing_stream.tasks)

    plain_model = copy.deepcopy(backbone)
    seed_everything(seed)
    log(f"plain PyTorch loop: {len(missing_stream.tasks)} tasks x {epochs} epochs")
    generator = torch.Generator().manual_seed(seed)
    tick = time.perf_counter()
    optimizer = torch.optim.Adam(plain_model.parameters(), lr=config.lr)
    for task in missing_stream.tasks:
        x, y = (t.to(device) for t in task.train.tensors())
        for _ in range(epochs):
            train_epoch(plain_model, x, y, criterion, optimizer, batch_size, generator)
    plain = LoopTiming("plain PyTorch loop", time.perf_counter() - tick, samples)

    seed_everything(seed)
    log(f"Avalanche Naive: {len(missing_stream.tasks)} tasks x {epochs} epochs")
    ctx = prepared.strategy_context(config, plugins=[])
    template = NaiveFineTuning().build(ctx)
    benchmark = missing_stream.avalanche_benchmark()
    tick = time.perf_counter()
    for experience in benchmark.train_stream:
        template.train(experience)
    framework = LoopTiming("Avalanche Naive", time.perf_counter() - tick, samples)
    return OverheadReport(
        stream=config.stream,
        source=dataset.source or dataset.name,
        tasks=len(missing_stream.tasks),
        epochs=epochs,
        batch_size=batch_size,
        device=str(device),
        threads=torch.get_num_threads(),
        framework=framework,
        plain=plain,
    )
