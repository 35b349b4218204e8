"""How do ``ours`` and ``ours-compositional`` scale with the number of modalities M?

For each M the synthetic stream gets M modalities, so 2^M - 1 tasks (every non-empty missing
pattern). Each (M, strategy) pair is one ``RunConfig`` run by ``cmmm.running.run``, the runner
and evaluator every strategy goes through, and reused when its ``results.json`` exists
(``cmmm.outcomes.run_or_reuse``), so a benchmark that was interrupted, or extended by one more
M, only runs what is missing. The table gives trainable parameters, the task-specific prompt
parameters (per pattern they grow with 2^M - 1, composed from per-modality components with 2M),
AA, FM and the run's train and wall time as its ``results.json`` recorded them.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from cmmm.atomic_files import atomic_write_text
from cmmm.backbone import MulT
from cmmm.errors import ConfigError
from cmmm.outcomes import RunOutcome, Status, run_or_reuse
from cmmm.pretraining import backbone_config_for
from cmmm.run_config import RunConfig, complete
from cmmm.running import PreparedRun, load_stream, resolve_device

# The synthetic generator's own three first, then extra ones. Pattern codes use a modality's first
# letter (cmmm.data.patterns.short_name), so the extras start with letters other than a, v and t
# ("thermal" would share "t" with text and make two patterns print the same code).
MODALITY_NAMES = ("audio", "video", "text", "depth", "infrared", "pressure")
MIN_MODALITIES, MAX_MODALITIES = 2, len(MODALITY_NAMES)
DEFAULT_MODALITY_COUNTS = (3, 4, 5)
DEFAULT_STRATEGIES = ("ours", "ours-compositional")
STREAM = "synthetic"


def synthetic_modality_options(m: int, n_train: int, n_test: int) -> dict[str, Any]:
    """Stream options of a synthetic stream with the first ``m`` of ``MODALITY_NAMES``.

    The first three keep the generator's defaults. Extra modality i takes the sequence length and
    feature width of default modality i mod 3, and a signal strength s chosen so that it carries
    as much evidence about the latent as audio, the middle one of the three: with orthonormal
    projections (streams.synthetic) a modality's evidence grows as s^2 * length * width, so
    s = s_audio * sqrt(len_audio * width_audio / (len * width)). Then no extra modality dominates
    (text stays the strongest single one, so the missing-text tasks stay the hard ones, as in the
    three-modality stream), none is as weak as video, and every extra is worth the same, so what
    changes from one M to the next is the number of modalities, not how informative the new one
    happens to be.
    """
    check_modality_counts([m])
    from cmmm.discovery import plugin_module

    defaults = plugin_module("streams.synthetic").SyntheticSpec()
    base = len(defaults.modalities)
    audio = defaults.modalities.index("audio")
    evidence = defaults.seq_lens[audio] * defaults.feature_dims[audio]
    seq_lens, feature_dims, signal = [], [], []
    for i in range(m):
        seq_len, width = defaults.seq_lens[i % base], defaults.feature_dims[i % base]
        seq_lens.append(seq_len)
        feature_dims.append(width)
        if i < base:
            signal.append(defaults.signal[i])
        else:
            strength = defaults.signal[audio] * math.sqrt(evidence / (seq_len * width))
            signal.append(round(strength, 3))  # short numbers in results.json and the run key
    return {
        "modalities": list(MODALITY_NAMES[:m]),
        "seq_lens": seq_lens,
        "feature_dims": feature_dims,
        "signal": signal,
        "n_train": n_train,
        "n_test": n_test,
    }


def check_modality_counts(counts: Sequence[int]) -> None:
    if not counts:
        raise ConfigError("--modalities names no modality count; write e.g. 3,4,5")
    for m in counts:
        if not MIN_MODALITIES <= m <= MAX_MODALITIES:
            raise ConfigError(
                f"--modalities {m}: the benchmark has {MIN_MODALITIES} to {MAX_MODALITIES} "
                f"modalities ({', '.join(MODALITY_NAMES)}); pick M in that range (M = 5 is "
                "already 31 tasks)"
            )
    repeated = sorted({m for m in counts if list(counts).count(m) > 1})
    if repeated:
        raise ConfigError(f"--modalities names {repeated} more than once; list each M once")


def parse_modality_counts(spec: str) -> list[int]:
    """``"3,4,5"`` -> [3, 4, 5], checked (ConfigError saying what to write)."""
    try:
        counts = [int(item) for item in spec.split(",") if item.strip()]
    except ValueError:
        raise ConfigError(
            f"--modalities {spec!r}: write comma-separated integers, e.g. 3,4,5"
        ) from None
    check_modality_counts(counts)
    return counts


def parse_strategies(spec: str | Sequence[str]) -> list[str]:
    """Registered strategy names from ``a,b`` (ConfigError listing the valid ones otherwise)."""
    from cmmm.strategy import STRATEGIES

    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [s for s in names if s]
    if not names:
        raise ConfigError("--strategies names no strategy; write e.g. ours,ours-compositional")
    for name in names:
        STRATEGIES.get(name)
    if len(set(names)) != len(names):
        raise ConfigError(f"--strategies {','.join(names)}: list each strategy once")
    return names


def task_specific_parameters(config: RunConfig) -> int | None:
    """Parameters of the strategy's task-specific prompts (its prompt module's ``task_specific``
    ParameterDict); None for a strategy without one.

    Counted on the module the strategy builds for this configuration's stream and backbone
    shape, so the count is the one of the run's own options (prompt length, width, form) whether
    the run was made now or reused. A randomly initialised backbone has the shape of the
    pre-trained one, so no pre-training is needed to count.
    """
    from cmmm.config import resolve

    resolved = resolve(config)
    config, strategy = resolved.config, resolved.strategy
    stream = load_stream(config, log=lambda _: None)
    backbone = MulT(stream.layout, backbone_config_for(stream.dataset, **config.backbone_options))
    prepared = PreparedRun(stream, backbone, {}, resolve_device("cpu"))
    # Building draws random prompt values; the caller's random state is left as it was.
    with torch.random.fork_rng(devices=[]):
        strategy.build(prepared.strategy_context(config, plugins=[]))
    prompts = getattr(strategy, "prompts", None)
    task_specific = getattr(prompts, "task_specific", None)
    if task_specific is None:
        return None
    return sum(p.numel() for p in task_specific.values())


@dataclass(frozen=True)
class ModalityRow:
    modalities: int
    strategy: str
    status: Status
    results_path: Path
    tasks: int
    task_specific: int | None
    trainable: int | None = None
    aa: float | None = None
    fm: float | None = None
    train_seconds: float | None = None
    wall_seconds: float | None = None
    # The run pre-trained the backbone (the other strategies of its M found it cached), so its
    # wall time holds that too.
    pretrained_here: bool = False
    error: str | None = None

    @classmethod
    def from_outcome(cls, m: int, outcome: RunOutcome, task_specific: int | None) -> ModalityRow:
        result = outcome.result
        common = {
            "modalities": m,
            "strategy": outcome.strategy,
            "status": outcome.status,
            "results_path": outcome.results_path,
            "task_specific": task_specific,
        }
        if result is None:
            return cls(tasks=2**m - 1, error=outcome.error, **common)
        return cls(
            tasks=len(result.stream.tasks),
            trainable=result.parameters.trainable,
            aa=result.aa,
            fm=result.fm,
            train_seconds=result.train_time_seconds,
            wall_seconds=result.wall_time_seconds,
            pretrained_here=result.pretraining.get("cached") is False,
            **common,
        )

    def cells(self) -> list[str]:
        def number(value: float | None, digits: int) -> str:
            return "n/a" if value is None else f"{value:.{digits}f}"

        def count(value: int | None) -> str:
            return "-" if value is None else f"{value:,}"

        if self.status == "failed":
            return [str(self.modalities), self.strategy, str(self.tasks)] + ["failed"] * 6
        return [
            str(self.modalities),
            self.strategy,
            str(self.tasks),
            count(self.trainable),
            count(self.task_specific),
            number(self.aa, 2),
            number(self.fm, 2),
            number(self.train_seconds, 1),
            number(self.wall_seconds, 1) + (PRETRAINED_MARK if self.pretrained_here else ""),
        ]


HEADER = [
    "M",
    "method",
    "tasks",
    "trainable",
    "task-specific",
    "AA (%)",
    "FM",
    "train (s)",
    "wall (s)",
]
PRETRAINED_MARK = " *"
CSV_FIELDS = [
    "modalities",
    "strategy",
    "tasks",
    "trainable",
    "task_specific",
    "aa",
    "fm",
    "train_seconds",
    "wall_seconds",
    "pretrained_here",
    "status",
    "results_path",
    "error",
]


@dataclass
class ModalityBenchmark:
    settings: str
    rows: list[ModalityRow]

    def header(self) -> str:
        return f"Stream: {STREAM} (seeded generator, not real data); {self.settings}."

    def markdown(self) -> str:
        lines = [
            "## Scaling with the number of modalities",
            "",
            self.header(),
            "",
            "M modalities give 2^M - 1 tasks. task-specific: parameters of the task-specific "
            "prompts; trainable: every parameter the method trains. AA and FM in %; train: "
            "seconds training, wall: seconds for the whole run (evaluating every task after "
            f"each step included);{PRETRAINED_MARK}: with pre-training the backbone, which the "
            "other runs of that M reuse.",
            "",
            "| " + " | ".join(HEADER) + " |",
            "|---:|---|" + "---:|" * (len(HEADER) - 2),
        ]
        lines += ["| " + " | ".join(row.cells()) + " |" for row in self.rows]
        failed = [row for row in self.rows if row.status == "failed"]
        if failed:
            lines += ["", "Failed runs:", ""]
            lines += [f"- M={row.modalities} {row.strategy}: {row.error}" for row in failed]
        return "\n".join(lines) + "\n"

    def table(self) -> Table:
        table = Table(title="scaling with the number of modalities", caption=self.header())
        for column in (*HEADER, "run"):
            table.add_column(column, justify="left" if column in ("method", "run") else "right")
        for row in self.rows:
            table.add_row(*row.cells(), row.status)
        return table

    def csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            record = dataclasses.asdict(row)
            writer.writerow({k: "" if record[k] is None else record[k] for k in CSV_FIELDS})
        return buffer.getvalue()

    def write(self, out: Path) -> tuple[Path, Path]:
        markdown_path = out / "modality-benchmark.md"
        csv_path = out / "modality-benchmark.csv"
        atomic_write_text(markdown_path, self.markdown())
        atomic_write_text(csv_path, self.csv())
        return markdown_path, csv_path


def _settings(base: RunConfig, counts: Sequence[int], n_train: int, n_test: int) -> str:
    text = (
        f"M = {', '.join(map(str, counts))}: the first M of "
        f"{', '.join(MODALITY_NAMES[: max(counts)])}; epochs {base.epochs} per task, "
        f"pretrain epochs {base.pretrain_epochs}, seed {base.seed}, n_train {n_train}, "
        f"n_test {n_test}"
    )
    # What the defaults do not show, so a table made with other options says so.
    for name in ("strategy_options", "backbone_options"):
        if getattr(base, name):
            text += f", {name} {getattr(base, name)}"
    return text


def benchmark_modalities(
    base: RunConfig,
    modality_counts: Sequence[int] = DEFAULT_MODALITY_COUNTS,
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    *,
    n_train: int,
    n_test: int,
    log: Callable[[str], None] = print,
) -> ModalityBenchmark:
    """Run (or reuse) every (M, strategy) pair on the synthetic stream with M modalities.

    ``base`` gives everything but the stream, its modalities and the strategy (epochs, seed, out,
    directories, and options shared by every run); its ``stream_options`` are kept under the
    benchmark's own. A failed run becomes a ``failed`` row and the others go on.
    """
    check_modality_counts(modality_counts)
    strategies = parse_strategies(strategies)
    for name, value in (("--n-train", n_train), ("--n-test", n_test)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    base = complete(replace(base, stream=STREAM))
    planned = [
        (
            m,
            strategy,
            # Completed per strategy: its changed option defaults belong to its run key.
            complete(
                replace(
                    base,
                    strategy=strategy,
                    stream_options={
                        **base.stream_options,
                        **synthetic_modality_options(m, n_train, n_test),
                    },
                )
            ),
        )
        for m in modality_counts
        for strategy in strategies
    ]
    rows = []
    for index, (m, strategy, config) in enumerate(planned, start=1):
        label = f"[{index}/{len(planned)}] M={m} ({2**m - 1} tasks) {strategy}"
        outcome = run_or_reuse(config, label, log)
        # A failed run may have failed building its strategy; its row shows no counts anyway.
        counted = None if outcome.status == "failed" else task_specific_parameters(config)
        rows.append(ModalityRow.from_outcome(m, outcome, counted))
    return ModalityBenchmark(_settings(base, modality_counts, n_train, n_test), rows)
