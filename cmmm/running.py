"""One continual run: load the stream, pre-train (cached), train a strategy, score, write.

Every strategy goes through the same ``run``: the same pre-trained backbone, the same tasks in
the same order, and the same evaluator after every experience. That is what makes comparisons
between strategies fair.
"""

from __future__ import annotations

import itertools
import json
import platform
import random
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from avalanche.core import SupervisedPlugin
from torch import Tensor, nn

from cmmm.atomic_files import atomic_write_text, remove_stale_temporaries
from cmmm.checkpoints import (
    CHECKPOINT_FILE,
    RunCheckpoint,
    capture_rng,
    event_file_sizes,
    read_checkpoint,
    restore_rng,
    rewind_event_files,
    write_checkpoint,
)
from cmmm.config import ResolvedRun, resolve
from cmmm.data.catalog import STREAMS, StreamRequest
from cmmm.data.missing_stream import MissingModalityStream, StreamTask, build_stream
from cmmm.data.patterns import parse_eval_patterns, parse_task_order
from cmmm.data.standardization import standardize
from cmmm.errors import CheckpointError, CmmmError, ConfigError, one_line
from cmmm.evaluation import EvalTask, Evaluator
from cmmm.pretraining import backbone_config_for, pretrained_backbone, task_criterion
from cmmm.results import (
    RESULTS_FILE,
    HeldOut,
    HeldOutTask,
    Parameters,
    Results,
    StrategyRecord,
    StreamRecord,
    TaskRecord,
    Validation,
)
from cmmm.run_config import RunConfig
from cmmm.run_guard import DivergenceGuard, locked_run_directory
from cmmm.strategy import StrategyContext
from cmmm.template_state import (
    StateContext,
    StreamSamples,
    capture_template_state,
    restore_template_state,
)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; use cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def count_parameters(model: nn.Module, trainable_only: bool) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@dataclass(frozen=True)
class ParameterCounts:
    """What a configuration trains: its model's trainable and total parameters, and the
    backbone's (the paper's budget is a share of the backbone)."""

    strategy: str
    tasks: int
    trainable: int
    total: int
    backbone: int

    def text(self) -> str:
        share = 100 * self.trainable / self.backbone
        return (
            f"{self.strategy} over {self.tasks} tasks: trainable parameters {self.trainable:,} "
            f"({share:.2f} % of the backbone's {self.backbone:,}); model total {self.total:,}"
        )


def parameter_counts(
    config: RunConfig | ResolvedRun, log: Callable[[str], None] = print
) -> ParameterCounts:
    """Build ``config``'s model on a freshly initialised backbone (parameter counts do not
    depend on the weights, so nothing is pre-trained or cached) and count its parameters."""
    from cmmm.backbone import MulT

    resolved = resolve(config)
    config = resolved.config
    seed_everything(config.seed)
    stream = load_stream(config, log)
    backbone = MulT(stream.layout, backbone_config_for(stream.dataset, **config.backbone_options))
    prepared = PreparedRun(stream, backbone, {}, torch.device("cpu"))
    model = resolved.strategy.build(prepared.strategy_context(config, plugins=[])).model
    return ParameterCounts(
        config.strategy,
        len(stream.tasks),
        trainable=count_parameters(model, trainable_only=True),
        total=count_parameters(model, trainable_only=False),
        backbone=count_parameters(backbone, trainable_only=False),
    )


def environment_record() -> dict[str, Any]:
    versions = {}
    for package in ("cmmm", "torch", "avalanche-lib", "numpy", "torchmetrics", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=Path(__file__).resolve().parent,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"versions": versions, "python": platform.python_version(), "commit": commit}


def load_stream(config: RunConfig, log: Callable[[str], None]) -> MissingModalityStream:
    entry = STREAMS.get(config.stream)
    request = StreamRequest(
        data_dir=Path(config.data_dir),
        cache_dir=Path(config.cache_dir),
        log=log,
        options=config.stream_options,
    )
    dataset = entry.factory(request)
    if config.standardize:
        dataset = standardize(dataset)
    order = parse_task_order(config.task_order, dataset.modalities)
    return build_stream(
        dataset,
        order,
        task_data=config.task_data,  # type: ignore[arg-type]
        seed=config.seed,
        held_out=parse_eval_patterns(config.eval_patterns, dataset.modalities, order),
        missing_rate=config.missing_rate,
        missing_mode=config.missing_mode,
    )


@dataclass
class PreparedRun:
    """The stream and the pre-trained backbone a run (or a benchmark) starts from."""

    stream: MissingModalityStream
    backbone: nn.Module
    pretraining: dict[str, Any]
    device: torch.device

    def strategy_context(self, config: RunConfig, plugins: list[Any]) -> StrategyContext:
        return StrategyContext(
            model=self.backbone,
            stream=self.stream,
            criterion=task_criterion(self.stream.dataset),
            epochs=config.epochs or 1,
            batch_size=config.batch_size,
            eval_batch_size=config.eval_batch_size,
            lr=config.lr,
            device=self.device,
            plugins=plugins,
        )


def prepare(config: RunConfig, log: Callable[[str], None]) -> PreparedRun:
    """Load the stream and the cached (or freshly) pre-trained backbone for a resolved config."""
    device = resolve_device(config.device)
    torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    stream = load_stream(config, log)
    backbone, record = pretrained_backbone(
        stream,
        backbone_config_for(stream.dataset, **config.backbone_options),
        epochs=config.pretrain_epochs or 0,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=config.seed,
        cache_dir=Path(config.cache_dir) / "pretrained",
        device=device,
        log=log,
    )
    return PreparedRun(stream=stream, backbone=backbone, pretraining=record, device=device)


def hyperparameters(config: RunConfig, strategy_options: Mapping[str, Any]) -> dict[str, Any]:
    """What TensorBoard's HPARAMS tab compares across runs: every setting that changes a result,
    the strategy's options in effect as ``option.<name>`` (lists as text; None as "none")."""
    values: dict[str, Any] = {
        k: v
        for k, v in asdict(config).items()
        if k not in ("out", "data_dir", "cache_dir") and isinstance(v, bool | int | float | str)
    }
    for name, value in strategy_options.items():
        if isinstance(value, bool | int | float | str):
            values[f"option.{name}"] = value
        else:
            values[f"option.{name}"] = "none" if value is None else json.dumps(value)
    values["run_key"] = config.key()
    return values


class TrainingMonitor(SupervisedPlugin):
    """Reports each epoch's mean training loss to TensorBoard and to the progress display."""

    def __init__(self, writer: Any, on_epoch: Callable[[int, int, float], None]) -> None:
        super().__init__()
        self.writer = writer
        self.on_epoch = on_epoch
        self.step = 0
        self.epoch = 0
        self.global_epoch = 0
        self._loss_sum: Tensor | float = 0.0
        self._samples = 0

    def start_step(self, step: int) -> None:
        self.step, self.epoch = step, 0

    def before_training_epoch(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self._loss_sum, self._samples = 0.0, 0

    def after_training_iteration(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        batch = len(strategy.mb_y)
        # Summed on the loss's device and read once per epoch: reading it every step would make
        # the host wait for a GPU at every step.
        self._loss_sum = self._loss_sum + strategy.loss.detach() * batch
        self._samples += batch

    def after_training_epoch(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        loss = float(self._loss_sum) / max(self._samples, 1)
        self.writer.add_scalar(f"train_loss/step{self.step}", loss, self.epoch)
        self.writer.add_scalar("train_loss/all", loss, self.global_epoch)
        self.on_epoch(self.step, self.epoch, loss)
        self.epoch += 1
        self.global_epoch += 1

    # Between steps only the epoch count over the whole run carries over (start_step sets the
    # rest, and the loss sums restart every epoch).
    def checkpoint_state(self, context: StateContext) -> dict[str, Any]:
        return {"global_epoch": self.global_epoch}

    def restore_checkpoint_state(self, state: dict[str, Any], context: StateContext) -> None:
        self.global_epoch = int(state["global_epoch"])


class RunStopped(Exception):
    """``run(..., stop_after=k)`` stopped as asked, once step k's checkpoint was written."""

    def __init__(self, run_dir: Path, completed_steps: int) -> None:
        super().__init__(
            f"stopped after step {completed_steps} as asked; continue with "
            f"`cmmm run --resume {run_dir}`"
        )
        self.run_dir = run_dir
        self.completed_steps = completed_steps


def resumable_config(run_dir: Path) -> tuple[ResolvedRun, RunCheckpoint]:
    """The resolved configuration of the run in ``run_dir`` (from its checkpoint, with ``out``
    set to the directory's parent) and the checkpoint itself."""
    path = run_dir / CHECKPOINT_FILE
    checkpoint = read_checkpoint(path)
    resolved = resolve(checkpoint.config, where=str(path), out=str(run_dir.parent))
    config = resolved.config
    checkpoint.check_config(asdict(config), config.key(), path)
    if config.run_dir().name != run_dir.name:
        raise CheckpointError(
            f"{run_dir}: its checkpoint's configuration belongs in a directory named "
            f"{config.run_dir().name}; rename the directory back, then resume"
        )
    return resolved, checkpoint


@dataclass(frozen=True)
class RunHooks:
    """What a run reports as it goes: messages, each epoch's loss, each step's accuracies, and
    the number of epochs it will train (once known)."""

    log: Callable[[str], None] = print
    on_epoch: Callable[[int, int, float], None] | None = None
    on_step: Callable[[int, list[dict[str, float]]], None] | None = None
    on_start: Callable[[int], None] | None = None


def run(
    config: RunConfig | ResolvedRun,
    log: Callable[[str], None] = print,
    on_epoch: Callable[[int, int, float], None] | None = None,
    on_step: Callable[[int, list[dict[str, float]]], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    *,
    resume: bool = False,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Run one configuration end to end and write ``results.json`` and TensorBoard events.

    ``config``: a ``RunConfig`` (resolved here, ``cmmm.config.resolve``) or what ``resolve``
    returned, whose strategy is the one trained. The run holds its directory's write lock
    (``cmmm.run_guard``): a second process writing the same run directory gets a
    ``RunDirectoryBusyError`` at once.

    Returns what ``results.json`` holds, as JSON values (``Results.from_json`` types it).

    After every training step the run replaces ``checkpoint.pt`` in its directory
    (``cmmm.checkpoints``). ``resume``: continue from that checkpoint; the result is the one an
    uninterrupted run would have written. Without ``resume``, a directory holding an unfinished
    run's checkpoint is refused rather than overwritten. ``stop_after=k``: raise ``RunStopped``
    once step k (1-based) and its checkpoint are done, as a crash there would (for tests, and to
    split a long run; ignored when k is the last step or beyond).
    """
    resolved = resolve(config)
    hooks = RunHooks(log, on_epoch, on_step, on_start)
    with locked_run_directory(resolved.config.run_dir()):
        return _run_locked(resolved, hooks, resume=resume, stop_after=stop_after)


def _run_locked(
    resolved: ResolvedRun, hooks: RunHooks, *, resume: bool, stop_after: int | None
) -> dict[str, Any]:
    """``run``'s work, once it holds the run directory's lock."""
    from torch.utils.tensorboard import SummaryWriter

    config, strategy = resolved.config, resolved.strategy
    log, on_epoch, on_step, on_start = hooks.log, hooks.on_epoch, hooks.on_step, hooks.on_start
    run_dir = config.run_dir()
    checkpoint_path = run_dir / CHECKPOINT_FILE
    checkpoint = read_checkpoint(checkpoint_path, log) if resume else None
    if checkpoint is not None:
        checkpoint.check_config(asdict(config), config.key(), checkpoint_path)
    elif checkpoint_path.exists() and not (run_dir / RESULTS_FILE).exists():
        raise CheckpointError(
            f"{run_dir} holds an unfinished run of this configuration ({CHECKPOINT_FILE}, no "
            f"{RESULTS_FILE}); continue it with `cmmm run --resume {run_dir}`, or delete the "
            "directory to start over"
        )
    started = time.perf_counter()
    prepared = prepare(config, log)
    stream, backbone, device = prepared.stream, prepared.backbone, prepared.device
    dataset = stream.dataset
    total_backbone = count_parameters(backbone, trainable_only=False)
    # Before the strategy builds its template: building draws the prompts' initial values.
    seed_everything(config.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    tensorboard_dir = run_dir / "tensorboard"
    if checkpoint is not None:
        # Back to the moment of the checkpoint: what a killed session wrote after it goes.
        rewind_event_files(tensorboard_dir, checkpoint.tensorboard)
        for path in (checkpoint_path, run_dir / RESULTS_FILE):
            remove_stale_temporaries(path)
    writer = SummaryWriter(log_dir=str(tensorboard_dir))
    try:
        monitor = TrainingMonitor(writer, on_epoch or (lambda *_: None))
        num_steps = 1 if strategy.joint else len(stream.tasks)
        guard = DivergenceGuard(
            num_steps,
            f"lower --lr (now {config.lr:g}) or check the data; the checkpoint of the last "
            f"finished step (if any) is kept in {run_dir}",
        )
        ctx = prepared.strategy_context(config, plugins=[monitor, guard])
        template = strategy.build(ctx)
        model: nn.Module = template.model

        def evaluator_of(tasks: list[StreamTask], split: str = "test") -> Evaluator:
            return Evaluator(
                [EvalTask(task.name, getattr(task, split)) for task in tasks],
                family=dataset.metric_family,
                num_classes=dataset.num_classes,
                batch_size=config.eval_batch_size,
                device=device,
                num_steps=num_steps,
            )

        evaluator = evaluator_of(stream.tasks)
        held_out = evaluator_of(stream.held_out) if stream.held_out else None
        # The same matrix on every task's validation split: what options are chosen on (test
        # numbers never are). None when a task has no validation samples.
        validation = (
            evaluator_of(stream.tasks, "valid")
            if all(len(task.valid) > 0 for task in stream.tasks)
            else None
        )
        benchmark = stream.avalanche_benchmark()
        samples = StreamSamples(benchmark.train_stream)
        first_step, train_seconds, earlier_wall = 0, 0.0, 0.0
        pretraining = prepared.pretraining
        if checkpoint is not None:
            if checkpoint.num_steps != num_steps:
                raise CheckpointError(
                    f"{checkpoint_path}: field 'num_steps' is {checkpoint.num_steps} but this "
                    f"run has {num_steps} steps; the checkpoint was edited or belongs elsewhere"
                )
            if validation is not None and "valid" not in checkpoint.evaluator:
                validation = None  # a checkpoint from before validation was recorded
            restore_checkpoint(
                checkpoint_path, template, checkpoint, samples, evaluator, held_out, validation
            )
            first_step = checkpoint.completed_steps
            train_seconds, earlier_wall = checkpoint.train_seconds, checkpoint.wall_seconds
            # How the run's backbone was made (this session may have found it in the cache).
            pretraining = checkpoint.pretraining
            # Last: building and restoring drew random numbers; the run continues from the
            # generators' state at the checkpoint.
            try:
                restore_rng(checkpoint.rng)
            except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
                raise CheckpointError(
                    f"{checkpoint_path}: field 'rng' cannot be restored ({type(error).__name__}: "
                    f"{one_line(error)[:160]}); delete the run directory to start the run over"
                ) from None
            log(f"resuming after step {first_step} of {num_steps} from {checkpoint_path}")
        if on_start is not None:
            on_start(config.epochs * (num_steps - first_step) if strategy.trains else 0)

        def score(step: int) -> None:
            per_task = evaluator.evaluate_and_record(step, model)
            for task, metrics in zip(stream.tasks, per_task, strict=True):
                writer.add_scalar(f"acc/{task.code}", metrics["acc"], step)
            summary = evaluator.summary()
            writer.add_scalar(
                "aa_so_far", float(np.mean([m["acc"] for m in per_task[: step + 1]])), step
            )
            if summary["fm"] is not None:
                writer.add_scalar("fm", summary["fm"], step)
            if held_out is not None:
                per_held_out = held_out.evaluate_and_record(step, model)
                for task, metrics in zip(stream.held_out, per_held_out, strict=True):
                    writer.add_scalar(f"held_out_acc/{task.code}", metrics["acc"], step)
                writer.add_scalar(
                    "aa_held_out", float(np.mean([m["acc"] for m in per_held_out])), step
                )
            if validation is not None:
                per_valid = validation.evaluate_and_record(step, model)
                writer.add_scalar(
                    "aa_valid", float(np.mean([m["acc"] for m in per_valid[: step + 1]])), step
                )
            if on_step is not None:
                on_step(step, per_task)

        def save_checkpoint(completed_steps: int) -> None:
            writer.flush()  # so that the recorded sizes end on whole events
            write_checkpoint(
                checkpoint_path,
                RunCheckpoint(
                    config=asdict(config),
                    run_key=config.key(),
                    completed_steps=completed_steps,
                    num_steps=num_steps,
                    template=capture_template_state(template, samples),
                    evaluator={
                        **evaluator.state_dict(),
                        **({} if held_out is None else {"held_out": held_out.state_dict()}),
                        **({} if validation is None else {"valid": validation.state_dict()}),
                    },
                    pretraining=pretraining,
                    train_seconds=train_seconds,
                    wall_seconds=earlier_wall + time.perf_counter() - started,
                    tensorboard=event_file_sizes(tensorboard_dir),
                    rng=capture_rng(),
                ),
            )

        # Joint training is one step over the whole stream.
        steps = [benchmark.train_stream] if strategy.joint else benchmark.train_stream
        for step, experience in itertools.islice(enumerate(steps), first_step, None):
            monitor.start_step(step)
            guard.start_step(step)
            tick = time.perf_counter()
            template.train(experience)
            train_seconds += time.perf_counter() - tick
            score(step)
            save_checkpoint(step + 1)
            if stop_after is not None and step + 1 == stop_after < num_steps:
                raise RunStopped(run_dir, step + 1)

        # A run is finished only when every step was trained and scored (a checkpoint claiming
        # more steps than it scored is refused when read; this is the last line of defence).
        if sorted(evaluator.history) != list(range(num_steps)):
            raise CheckpointError(
                f"{run_dir}: only steps {sorted(evaluator.history)} of {num_steps} were scored; "
                "no results written. Delete the run directory to start over"
            )
        summary = evaluator.summary()
        results = results_record(
            config,
            prepared,
            strategy,
            summary,
            model,
            held_out=None if held_out is None else held_out.summary(),
            valid=None if validation is None else validation.summary(),
            total_backbone=total_backbone,
            pretraining=pretraining,
            wall_seconds=earlier_wall + time.perf_counter() - started,
            train_seconds=train_seconds,
        )
        writer.add_hparams(
            hyperparameters(config, strategy.options()),
            {"hparam/aa": summary["aa"] or 0.0, "hparam/fm": summary["fm"] or 0.0},
            run_name=".",
        )
    finally:
        writer.close()
    # Checked as any reader will check it, so that a run never writes a file readers refuse.
    record = results.to_json()
    Results.from_json(record)
    atomic_write_text(run_dir / RESULTS_FILE, json.dumps(record, indent=2))
    return record


def restore_checkpoint(
    path: Path,
    template: Any,
    checkpoint: RunCheckpoint,
    samples: StreamSamples,
    evaluator: Evaluator,
    held_out: Evaluator | None,
    validation: Evaluator | None = None,
) -> None:
    """Put the checkpoint's template and evaluator states back; a state that does not fit (an
    edited field, a tensor of the wrong shape) is a ``CheckpointError`` naming the field."""
    field_name = "template"
    try:
        restore_template_state(template, checkpoint.template, samples)
        field_name = "evaluator"
        evaluator.load_state_dict(checkpoint.evaluator)
        if held_out is not None:
            field_name = "evaluator.held_out"
            held_out.load_state_dict(checkpoint.evaluator["held_out"])
        if validation is not None:
            field_name = "evaluator.valid"
            validation.load_state_dict(checkpoint.evaluator["valid"])
    except CheckpointError as error:
        # Say where and what to do: a checkpoint of an older version of the strategy cannot
        # resume, and only deleting its run directory lets the run start over.
        raise CheckpointError(
            f"{path}: {error}; delete the run directory to start the run over"
        ) from None
    except (CmmmError, KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
        raise CheckpointError(
            f"{path}: field {field_name!r} cannot be restored ({type(error).__name__}: "
            f"{one_line(error)[:160]}); the checkpoint was damaged or edited, delete the run "
            "directory to start the run over"
        ) from None


def results_record(
    config: RunConfig,
    prepared: PreparedRun,
    strategy: Any,
    summary: dict[str, Any],
    model: nn.Module,
    *,
    held_out: dict[str, Any] | None = None,
    valid: dict[str, Any] | None = None,
    total_backbone: int,
    pretraining: dict[str, Any],
    wall_seconds: float,
    train_seconds: float,
) -> Results:
    """What ``results.json`` holds (see docs/outputs.md). ``total_backbone``: the
    backbone's parameters, counted before the strategy wrapped it. ``held_out``: the summary of
    the held-out patterns' evaluator, when the run has any; ``valid``: the same evaluator's
    summary on every task's validation split."""
    stream = prepared.stream
    dataset = stream.dataset
    trainable = count_parameters(model, trainable_only=True)
    return Results(
        config=asdict(config),
        run_dir=str(config.run_dir()),
        stream=StreamRecord(
            name=dataset.name,
            source=dataset.source,
            modalities=list(dataset.modalities),
            layout=stream.layout.describe(),
            task_data=stream.task_data,
            missing_rate=stream.missing_rate,
            missing_mode=stream.missing_mode,
            tasks=[
                TaskRecord(
                    index=t.index,
                    name=t.name,
                    code=t.code,
                    pattern=list(t.pattern),
                    train_samples=len(t.train),
                    test_samples=len(t.test),
                )
                for t in stream.tasks
            ],
        ),
        strategy=StrategyRecord(
            name=config.strategy,
            joint=strategy.joint,
            trains=strategy.trains,
            options=strategy.options(),
        ),
        pretraining=pretraining,
        metric_family=summary["metric_family"],
        matrix=summary["matrix"],
        aa=summary["aa"],
        fm=summary["fm"],
        bwt=summary["bwt"],
        aa_so_far=summary["aa_so_far"],
        per_task_final=summary["per_task_final"],
        history=summary["history"],
        parameters=Parameters(
            trainable=trainable,
            total=count_parameters(model, trainable_only=False),
            backbone=total_backbone,
            trainable_share_of_backbone=trainable / total_backbone,
        ),
        # Rows: training steps (as in "matrix"); columns: the held-out patterns.
        held_out=None
        if held_out is None
        else HeldOut(
            tasks=[
                HeldOutTask(
                    name=t.name, code=t.code, pattern=list(t.pattern), test_samples=len(t.test)
                )
                for t in stream.held_out
            ],
            matrix=held_out["matrix"],
            aa=held_out["aa"],
            per_task_final=held_out["per_task_final"],
        ),
        # Rows and columns as in "matrix", on each task's validation split: what options are
        # chosen on.
        valid=None
        if valid is None
        else Validation(
            matrix=valid["matrix"],
            aa=valid["aa"],
            fm=valid["fm"],
            per_task_final=valid["per_task_final"],
        ),
        device=str(prepared.device),
        wall_time_seconds=wall_seconds,
        train_time_seconds=train_seconds,
        environment=environment_record(),
    )
