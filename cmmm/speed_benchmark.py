"""``cmmm benchmark speed``: the stacked MulT against the one-transformer-at-a-time reference.

What is timed, for ``naive`` (the whole MulT trains) and ``ours`` (the frozen MulT with the
method's prompts, one task's trainable set):

* a training step on a batch of MOSI-shaped inputs (three modalities of one time step each,
  73/100/100 features; batch 64; L1 loss): zero the gradients, forward, backward, Adam update.
  The new side is ``cmmm.backbone.MulT`` with the fused Adam every strategy now uses; the
  reference is the MulT as it was before the stacks (``tests/reference_mult.py``, the same
  maths one transformer at a time) with the unfused Adam it used, and for ``ours`` the prompts
  as it received them then: one (B, P, d) tensor per site.
* an evaluation pass over seven MOSI-sized test sets (752 samples each, one per missing
  pattern): the new evaluator's large batches against a ``DataLoader`` of batch 256 sample by
  sample, the evaluator as it was. Both under ``torch.inference_mode``.

Inputs are random (seeded), not data: only shapes matter for speed. Variants alternate within
every round and each round times ``steps`` repetitions after a warm-up, so that a slow spell of
this shared machine hits both sides; the table gives min and median over rounds and the ratio of
the medians. The FLOPs of one step are counted by ``torch.utils.flop_counter`` and compared with
the machine's measured matmul throughput on the step's typical shape.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from cmmm.backbone import MulT, MulTConfig, PromptContext, PromptSite, per_sample_prompt
from cmmm.data.packing import PackedLayout
from cmmm.errors import ConfigError
from cmmm.optimizers import adam

MOSI_LAYOUT = PackedLayout(("audio", "video", "text"), (1, 1, 1), (73, 100, 100))
MOSI_TEST_SIZE = 752
REFERENCE_FILE = Path(__file__).resolve().parent.parent / "tests" / "reference_mult.py"


def load_reference() -> type[nn.Module]:
    """The reference MulT class from the source checkout's tests (it is not installed)."""
    if not REFERENCE_FILE.is_file():
        raise ConfigError(
            f"the reference MulT is read from {REFERENCE_FILE}, which this installation lacks; "
            "run the benchmark from a source checkout (pip install -e .)"
        )
    spec = importlib.util.spec_from_file_location("cmmm_reference_mult", REFERENCE_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ReferenceMulT


@dataclass
class Timing:
    """Milliseconds of one measured thing, one value per round."""

    name: str
    milliseconds: list[float] = field(default_factory=list)

    @property
    def minimum(self) -> float:
        return min(self.milliseconds)

    @property
    def median(self) -> float:
        return statistics.median(self.milliseconds)


@dataclass
class Comparison:
    """The new and the reference side of one measurement."""

    what: str
    new: Timing
    reference: Timing

    @property
    def ratio(self) -> float:
        """Reference median over new median: how many times faster the new side is."""
        return self.reference.median / self.new.median


@dataclass
class SpeedReport:
    comparisons: list[Comparison]
    rounds: int
    steps: int
    threads: int
    device: str
    step_flops: int
    matmul_gflops: float

    def markdown(self) -> str:
        lines = [
            f"MOSI shapes (random inputs), batch 64, {self.rounds} alternated rounds of "
            f"{self.steps} repetitions, {self.threads} thread(s), {self.device}",
            "",
            "| measurement | new min (ms) | new median (ms) | reference min (ms) "
            "| reference median (ms) | speed-up (median) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for c in self.comparisons:
            lines.append(
                f"| {c.what} | {c.new.minimum:.1f} | {c.new.median:.1f} | "
                f"{c.reference.minimum:.1f} | {c.reference.median:.1f} | {c.ratio:.2f}x |"
            )
        naive = next(c for c in self.comparisons if c.what == "naive: training step")
        achieved = self.step_flops / (naive.new.median / 1000) / 1e9
        lines += [
            "",
            f"naive training step: {self.step_flops / 1e6:.0f} MFLOP (forward and backward); "
            f"at the new median that is {achieved:.1f} GFLOP/s, "
            f"{100 * achieved / self.matmul_gflops:.0f} % of the {self.matmul_gflops:.0f} GFLOP/s "
            "this machine's batched matmul reaches on (6, 64, 30) x (6, 30, 120)",
        ]
        return "\n".join(lines)


def _batch(layout: PackedLayout, batch: int, generator: torch.Generator) -> Tensor:
    features = {
        m: torch.randn(batch, n, d, generator=generator)
        for m, n, d in zip(layout.modalities, layout.seq_lens, layout.feature_dims, strict=True)
    }
    return layout.pack(features, torch.ones(batch, len(layout.modalities)))


def _pattern_batch(
    layout: PackedLayout, batch: int, pattern: tuple[bool, ...], generator: torch.Generator
) -> Tensor:
    features = {
        m: torch.randn(batch, n, d, generator=generator)
        for m, n, d in zip(layout.modalities, layout.seq_lens, layout.feature_dims, strict=True)
    }
    presence = torch.tensor([float(p) for p in pattern]).expand(batch, -1)
    return layout.pack(features, presence)


class _ReferencePrompted(nn.Module):
    """The reference backbone with ``ours``' prompts as it used to receive them: a per-sample
    (B, P, d) tensor at every site."""

    def __init__(self, backbone: nn.Module, prompts: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.prompts = prompts

    def _hook(self, site: PromptSite, ctx: PromptContext) -> Tensor | None:
        return per_sample_prompt(self.prompts.prompt_for(site, ctx), ctx.batch_size)

    def forward(self, x: Tensor) -> Tensor:
        with self.backbone.using_prompt_hook(self._hook):
            return self.backbone(x)


def _ours_models(backbone: nn.Module, reference: bool) -> tuple[nn.Module, list[nn.Parameter]]:
    from cmmm.discovery import plugin_module
    from cmmm.prompted_model import PromptedModel, set_requires_grad

    ours = plugin_module("strategies.ours")
    options = ours.OursOptions.from_options({})
    layers = ours.resolve_layers(options, backbone.config.layers)
    prompts = ours.OursPrompts(MOSI_LAYOUT.modalities, backbone.config.d_model, options, layers)
    set_requires_grad(backbone.parameters(), False)
    # One task (text only) trains: the shared prompts, the keys and that pattern's set.
    text_only = (False, False, True)
    set_requires_grad(prompts.task_specific_parameters(), False)
    set_requires_grad(prompts.trainable_for(text_only), True)
    model = _ReferencePrompted(backbone, prompts) if reference else PromptedModel(backbone, prompts)
    return model, [p for p in model.parameters() if p.requires_grad]


def _step_function(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor
) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.l1_loss(model(x), y).backward()
        optimizer.step()

    return step


def _eval_function(model: nn.Module, test_sets: list[Tensor], new: bool) -> Callable[[], None]:
    def evaluate_new() -> None:
        with torch.inference_mode():
            for x in test_sets:
                for chunk in x.split(1024):
                    model(chunk)

    def evaluate_reference() -> None:
        with torch.inference_mode():
            for x in test_sets:
                loader = DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=256)
                for batch in loader:
                    model(batch[0])

    return evaluate_new if new else evaluate_reference


def _time(function: Callable[[], None], repetitions: int) -> float:
    """Milliseconds per call of ``function`` over ``repetitions`` calls."""
    tick = time.perf_counter()
    for _ in range(repetitions):
        function()
    return (time.perf_counter() - tick) * 1000 / repetitions


def matmul_throughput(repetitions: int = 2000) -> float:
    """GFLOP/s of the batched matmul (6, 64, 30) x (6, 30, 120): the cross-modal FFN's shape."""
    a, b = torch.randn(6, 64, 30), torch.randn(6, 30, 120)
    flops = 2 * 6 * 64 * 30 * 120
    best = float("inf")
    for _ in range(5):
        tick = time.perf_counter()
        for _ in range(repetitions):
            torch.bmm(a, b)
        best = min(best, (time.perf_counter() - tick) / repetitions)
    return flops / best / 1e9


def step_flops(model: nn.Module, x: Tensor, y: Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        F.l1_loss(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def measure_speed(rounds: int = 5, steps: int = 20, threads: int = 1, seed: int = 0) -> SpeedReport:
    if not 1 <= rounds <= 1000 or not 1 <= steps <= 10000:
        raise ConfigError(f"--rounds must be 1..1000 and --steps 1..10000, got {rounds}, {steps}")
    torch.set_num_threads(threads)
    reference_class = load_reference()
    config = MulTConfig()
    generator = torch.Generator().manual_seed(seed)
    x = _batch(MOSI_LAYOUT, 64, generator)
    y = torch.randn(64, generator=generator)
    x_text = _pattern_batch(MOSI_LAYOUT, 64, (False, False, True), generator)
    patterns = [
        tuple(bool(bit) for bit in ((k >> 0) & 1, (k >> 1) & 1, (k >> 2) & 1)) for k in range(1, 8)
    ]
    test_sets = [
        _pattern_batch(MOSI_LAYOUT, MOSI_TEST_SIZE, pattern, generator) for pattern in patterns
    ]

    def pair(reference: bool) -> tuple[nn.Module, nn.Module]:
        torch.manual_seed(seed)
        backbone: Any = reference_class(MOSI_LAYOUT, config) if reference else MulT(MOSI_LAYOUT)
        torch.manual_seed(seed)
        frozen: Any = reference_class(MOSI_LAYOUT, config) if reference else MulT(MOSI_LAYOUT)
        return backbone.train(), frozen.train()

    work: dict[str, dict[str, Callable[[], None]]] = {}
    for side in ("new", "reference"):
        naive, frozen = pair(side == "reference")
        ours, ours_params = _ours_models(frozen, side == "reference")
        ours.train()
        if side == "new":
            naive_optimizer = adam(naive.parameters(), 1e-3)
            ours_optimizer = adam(ours_params, 1e-3)
        else:
            naive_optimizer = torch.optim.Adam(naive.parameters(), lr=1e-3)
            ours_optimizer = torch.optim.Adam(ours_params, lr=1e-3)
        eval_naive, eval_ours = pair(side == "reference")
        eval_ours_model, _ = _ours_models(eval_ours, side == "reference")
        work[side] = {
            "naive: training step": _step_function(naive, naive_optimizer, x, y),
            "ours: training step": _step_function(ours, ours_optimizer, x_text, y),
            "naive: evaluation pass (7 x 752)": _eval_function(
                eval_naive.eval(), test_sets, side == "new"
            ),
            "ours: evaluation pass (7 x 752)": _eval_function(
                eval_ours_model.eval(), test_sets, side == "new"
            ),
        }
    comparisons = [
        Comparison(what, Timing("new"), Timing("reference")) for what in work["new"].keys()
    ]
    for comparison in comparisons:
        for side in ("new", "reference"):
            work[side][comparison.what]()  # warm-up
    for index in range(rounds):
        # Alternate which side goes first, so that neither always meets the machine warmer.
        order = ("new", "reference") if index % 2 == 0 else ("reference", "new")
        for comparison in comparisons:
            repetitions = steps if "training" in comparison.what else max(1, steps // 10)
            for side in order:
                timing = comparison.new if side == "new" else comparison.reference
                timing.milliseconds.append(_time(work[side][comparison.what], repetitions))
    torch.manual_seed(seed)
    flops = step_flops(MulT(MOSI_LAYOUT).train(), x, y)
    return SpeedReport(
        comparisons=comparisons,
        rounds=rounds,
        steps=steps,
        threads=torch.get_num_threads(),
        device="cpu",
        step_flops=flops,
        matmul_gflops=matmul_throughput(),
    )
