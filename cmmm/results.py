"""A finished run's ``results.json`` as one typed object, ``Results``, written and read here only.

The runner builds a ``Results`` and writes ``Results.to_json()``; ``cmmm summarize``, ``cmmm
plot``, ``cmmm compare``, experiments and the Python API read runs back with ``Results.load`` (or
``load_results``/``find_results`` for directories), so a file one of them accepts, all accept,
and each reads attributes instead of digging in dictionaries. The JSON schema is the one runs
have always written (docs/outputs.md): ``Results.from_json(d).to_json() == d`` for every run,
including runs written before optional keys (``valid``, ``held_out``, ``strategy.trains``)
existed.

Parts whose content varies with the stream, the strategy or the cmmm version (``config``,
``pretraining``, per-task metrics, ``history``, ``environment``, strategy options) stay plain
JSON values: typing them would either refuse older runs or drop keys on the way back.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from cmmm.errors import DataError

RESULTS_FILE = "results.json"

T = TypeVar("T")
Matrix = list[list[float | None]]
Metrics = dict[str, Any]


class _Malformed(Exception):
    """A key (dotted path) that is missing or has the wrong type; made a ``DataError`` once."""

    def __init__(self, where: str) -> None:
        super().__init__(where)
        self.where = where


def _field(values: Any, key: str, where: str, check: Callable[[Any], bool]) -> Any:
    if not isinstance(values, Mapping) or key not in values or not check(values[key]):
        raise _Malformed(f"{where}{key}")
    return values[key]


def _optional(values: Mapping[str, Any], key: str, where: str, check: Callable[[Any], bool]) -> Any:
    return _field(values, key, where, check) if key in values else None


def _is_number(value: Any) -> bool:
    # bool is an int to Python but never a metric.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_metric(value: Any) -> bool:
    """A score, or null where it is undefined (FM of a joint run, a cell not evaluated)."""
    return value is None or _is_number(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_dict(value: Any) -> bool:
    return isinstance(value, dict)


def _is_list(value: Any) -> bool:
    return isinstance(value, list)


def _is_matrix(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(row, list) and all(map(_is_metric, row)) for row in value
    )


def _is_metrics_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, dict) for item in value)


def _is_optional_numbers(value: Any) -> bool:
    return value is None or (isinstance(value, list) and all(map(_is_metric, value)))


def _records(
    values: Mapping[str, Any], key: str, where: str, parse: Callable[[Any, str], T]
) -> list[T]:
    items = _field(values, key, where, _is_list)
    return [parse(item, f"{where}{key}[{i}].") for i, item in enumerate(items)]


def as_array(matrix: Matrix) -> np.ndarray:
    """A JSON accuracy matrix as floats, NaN where a cell is null (not evaluated)."""
    return np.array(
        [[np.nan if v is None else float(v) for v in row] for row in matrix], dtype=np.float64
    )


@dataclass(frozen=True)
class TaskRecord:
    """One task of the stream: its missing-modality pattern and split sizes."""

    index: int
    name: str
    code: str
    pattern: list[bool]
    train_samples: int
    test_samples: int

    @classmethod
    def from_json(cls, values: Any, where: str) -> TaskRecord:
        return cls(
            index=_field(values, "index", where, _is_int),
            name=_field(values, "name", where, _is_str),
            code=_field(values, "code", where, _is_str),
            pattern=_field(values, "pattern", where, _is_list),
            train_samples=_field(values, "train_samples", where, _is_int),
            test_samples=_field(values, "test_samples", where, _is_int),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "code": self.code,
            "pattern": list(self.pattern),
            "train_samples": self.train_samples,
            "test_samples": self.test_samples,
        }


@dataclass(frozen=True)
class StreamRecord:
    """The stream the run trained on: dataset, layout, missing-modality settings, tasks."""

    name: str
    source: str
    modalities: list[str]
    layout: str
    task_data: str
    missing_rate: float
    missing_mode: str
    tasks: list[TaskRecord]

    @classmethod
    def from_json(cls, values: Any, where: str = "stream.") -> StreamRecord:
        return cls(
            name=_field(values, "name", where, _is_str),
            source=_field(values, "source", where, _is_str),
            modalities=_field(values, "modalities", where, _is_list),
            layout=_field(values, "layout", where, _is_str),
            task_data=_field(values, "task_data", where, _is_str),
            missing_rate=_field(values, "missing_rate", where, _is_number),
            missing_mode=_field(values, "missing_mode", where, _is_str),
            tasks=_records(values, "tasks", where, TaskRecord.from_json),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "modalities": list(self.modalities),
            "layout": self.layout,
            "task_data": self.task_data,
            "missing_rate": self.missing_rate,
            "missing_mode": self.missing_mode,
            "tasks": [task.to_json() for task in self.tasks],
        }


@dataclass(frozen=True)
class StrategyRecord:
    """The strategy: its registered name, how it trains, every option in effect."""

    name: str
    joint: bool
    options: dict[str, Any]
    # None: not recorded (runs from before the zero-shot reference, all of which trained).
    trains: bool | None = None

    @property
    def trained(self) -> bool:
        """False only for a strategy that trains nothing (the zero-shot reference)."""
        return self.trains is not False

    @property
    def buffer(self) -> int | None:
        """The replay buffer's size, for the strategies that have one."""
        value = self.options.get("mem_size")
        return value if _is_int(value) else None

    @classmethod
    def from_json(cls, values: Any, where: str = "strategy.") -> StrategyRecord:
        return cls(
            name=_field(values, "name", where, _is_str),
            joint=_field(values, "joint", where, _is_bool),
            options=_field(values, "options", where, _is_dict),
            trains=_optional(values, "trains", where, _is_bool),
        )

    def to_json(self) -> dict[str, Any]:
        trains = {} if self.trains is None else {"trains": self.trains}
        return {"name": self.name, "joint": self.joint, **trains, "options": self.options}


@dataclass(frozen=True)
class Parameters:
    """Parameter counts: what trains, the whole model, and the backbone before wrapping."""

    trainable: int
    total: int
    backbone: int
    trainable_share_of_backbone: float

    @classmethod
    def from_json(cls, values: Any, where: str = "parameters.") -> Parameters:
        return cls(
            trainable=_field(values, "trainable", where, _is_int),
            total=_field(values, "total", where, _is_int),
            backbone=_field(values, "backbone", where, _is_int),
            trainable_share_of_backbone=_field(
                values, "trainable_share_of_backbone", where, _is_number
            ),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "trainable": self.trainable,
            "total": self.total,
            "backbone": self.backbone,
            "trainable_share_of_backbone": self.trainable_share_of_backbone,
        }


@dataclass(frozen=True)
class HeldOutTask:
    """A missing case tested but never trained on (``--eval-patterns``)."""

    name: str
    code: str
    pattern: list[bool]
    test_samples: int

    @classmethod
    def from_json(cls, values: Any, where: str) -> HeldOutTask:
        return cls(
            name=_field(values, "name", where, _is_str),
            code=_field(values, "code", where, _is_str),
            pattern=_field(values, "pattern", where, _is_list),
            test_samples=_field(values, "test_samples", where, _is_int),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "code": self.code,
            "pattern": list(self.pattern),
            "test_samples": self.test_samples,
        }


@dataclass(frozen=True)
class HeldOut:
    """Scores on the held-out patterns: rows are training steps, columns the patterns."""

    tasks: list[HeldOutTask]
    matrix: Matrix
    aa: float | None
    per_task_final: list[Metrics]

    @classmethod
    def from_json(cls, values: Any, where: str = "held_out.") -> HeldOut:
        return cls(
            tasks=_records(values, "tasks", where, HeldOutTask.from_json),
            matrix=_field(values, "matrix", where, _is_matrix),
            aa=_field(values, "aa", where, _is_metric),
            per_task_final=_field(values, "per_task_final", where, _is_metrics_list),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "tasks": [task.to_json() for task in self.tasks],
            "matrix": self.matrix,
            "aa": self.aa,
            "per_task_final": self.per_task_final,
        }


@dataclass(frozen=True)
class Validation:
    """The run's matrix and scores on every task's validation split: what to choose options on."""

    matrix: Matrix
    aa: float | None
    fm: float | None
    per_task_final: list[Metrics]

    @classmethod
    def from_json(cls, values: Any, where: str = "valid.") -> Validation:
        return cls(
            matrix=_field(values, "matrix", where, _is_matrix),
            aa=_field(values, "aa", where, _is_metric),
            fm=_field(values, "fm", where, _is_metric),
            per_task_final=_field(values, "per_task_final", where, _is_metrics_list),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "matrix": self.matrix,
            "aa": self.aa,
            "fm": self.fm,
            "per_task_final": self.per_task_final,
        }


@dataclass(frozen=True)
class BackboneIdentity:
    """Which pre-trained backbone a run started from, as its ``pretraining`` record says.

    The cache key names how a backbone was made, not the weights it got: pre-training is
    deterministic on one machine but not across CPUs, so a key can stand for different weights
    on two machines. Runs record the weights' SHA-256 since it was added; older runs are told
    apart by their key and best validation loss (equal losses to the last bit with different
    weights are not a practical case).
    """

    key: str | None
    valid_loss: float | None
    weights_sha256: str | None

    def same_as(self, other: BackboneIdentity) -> bool:
        if self.weights_sha256 and other.weights_sha256:
            return self.weights_sha256 == other.weights_sha256
        return (self.key, self.valid_loss) == (other.key, other.valid_loss)


@dataclass(frozen=True)
class Results:
    """One finished run, key for key what its ``results.json`` holds (see docs/outputs.md)."""

    # The fully resolved configuration (``RunConfig`` fields of the version that ran it).
    config: dict[str, Any]
    # The run directory as the run named it (relative to where it was started, maybe).
    run_dir: str
    stream: StreamRecord
    strategy: StrategyRecord
    pretraining: dict[str, Any]
    metric_family: str
    # Accuracy (%) on task i (column) after step j (row); null where not evaluated.
    matrix: Matrix
    aa: float | None
    fm: float | None
    bwt: float | None
    aa_so_far: list[float | None] | None
    per_task_final: list[Metrics]
    history: list[Any]
    parameters: Parameters
    device: str
    wall_time_seconds: float
    train_time_seconds: float
    environment: dict[str, Any]
    held_out: HeldOut | None = None
    valid: Validation | None = None
    # The file it was read from (None when built by the run); not part of the JSON.
    path: Path | None = field(default=None, compare=False)

    @property
    def directory(self) -> Path:
        """Where the run's files are now: the directory it was read from, else its run_dir."""
        return self.path.parent if self.path is not None else Path(self.run_dir)

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    @property
    def joint(self) -> bool:
        return self.strategy.joint

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.stream.tasks]

    @property
    def backbone(self) -> BackboneIdentity:
        record = self.pretraining
        loss = record.get("valid_loss")
        return BackboneIdentity(
            key=record.get("key"),
            valid_loss=float(loss) if _is_number(loss) else None,
            weights_sha256=record.get("weights_sha256"),
        )

    @property
    def task_codes(self) -> list[str]:
        return [task.code for task in self.stream.tasks]

    def matrix_array(self) -> np.ndarray:
        """``matrix`` as floats, NaN where a cell was not evaluated."""
        return as_array(self.matrix)

    def final_accuracies(self) -> dict[str, float]:
        """task code -> accuracy on it after the last step, where it was scored."""
        return {
            task.code: final["acc"]
            for task, final in zip(self.stream.tasks, self.per_task_final, strict=False)
            if _is_number(final.get("acc"))
        }

    @classmethod
    def from_json(cls, values: Any, path: Path | None = None) -> Results:
        """Check and type one parsed ``results.json``; ``path`` names it in the error."""
        source = f"{path}" if path is not None else RESULTS_FILE
        try:
            results = cls(
                config=_field(values, "config", "", _is_dict),
                run_dir=_field(values, "run_dir", "", _is_str),
                stream=StreamRecord.from_json(_field(values, "stream", "", _is_dict)),
                strategy=StrategyRecord.from_json(_field(values, "strategy", "", _is_dict)),
                pretraining=_field(values, "pretraining", "", _is_dict),
                metric_family=_field(values, "metric_family", "", _is_str),
                matrix=_field(values, "matrix", "", _is_matrix),
                aa=_field(values, "aa", "", _is_metric),
                fm=_field(values, "fm", "", _is_metric),
                bwt=_field(values, "bwt", "", _is_metric),
                aa_so_far=_field(values, "aa_so_far", "", _is_optional_numbers),
                per_task_final=_field(values, "per_task_final", "", _is_metrics_list),
                history=_field(values, "history", "", _is_list),
                parameters=Parameters.from_json(_field(values, "parameters", "", _is_dict)),
                device=_field(values, "device", "", _is_str),
                wall_time_seconds=_field(values, "wall_time_seconds", "", _is_number),
                train_time_seconds=_field(values, "train_time_seconds", "", _is_number),
                environment=_field(values, "environment", "", _is_dict),
                held_out=None
                if values.get("held_out") is None
                else HeldOut.from_json(values["held_out"]),
                valid=None
                if values.get("valid") is None
                else Validation.from_json(values["valid"]),
                path=path,
            )
            _field(results.config, "stream", "config.", _is_str)
            _field(results.config, "seed", "config.", _is_int)
        except _Malformed as error:
            raise DataError(
                f"{source}: not a cmmm {RESULTS_FILE} (missing or malformed {error.where!r}); "
                "write it with `cmmm run`"
            ) from None
        steps = 1 if results.joint else len(results.stream.tasks)
        shape = (len(results.matrix), *{len(row) for row in results.matrix})
        if shape != (steps, len(results.stream.tasks)):
            raise DataError(
                f"{source}: the accuracy matrix should be {steps} x {len(results.stream.tasks)} "
                f"(steps x tasks), got {' x '.join(map(str, shape))}"
            )
        return results

    def to_json(self) -> dict[str, Any]:
        """The ``results.json`` content, keys in the order runs write them."""
        extra: dict[str, Any] = {}
        if self.held_out is not None:
            extra["held_out"] = self.held_out.to_json()
        if self.valid is not None:
            extra["valid"] = self.valid.to_json()
        return {
            "config": self.config,
            "run_dir": self.run_dir,
            "stream": self.stream.to_json(),
            "strategy": self.strategy.to_json(),
            "pretraining": self.pretraining,
            "metric_family": self.metric_family,
            "matrix": self.matrix,
            "aa": self.aa,
            "fm": self.fm,
            "bwt": self.bwt,
            "aa_so_far": self.aa_so_far,
            "per_task_final": self.per_task_final,
            "history": self.history,
            "parameters": self.parameters.to_json(),
            **extra,
            "device": self.device,
            "wall_time_seconds": self.wall_time_seconds,
            "train_time_seconds": self.train_time_seconds,
            "environment": self.environment,
        }

    def dumps(self) -> str:
        """The file's text, as runs write it."""
        return json.dumps(self.to_json(), indent=2)

    @classmethod
    def load(cls, path: str | Path) -> Results:
        """Read one ``results.json``; a missing, unreadable or malformed file is a ``DataError``
        naming it."""
        file = Path(path)
        try:
            values = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"{file}: not a readable {RESULTS_FILE} ({error})") from None
        return cls.from_json(values, file)


def read_results(file: Path) -> Results:
    """``Results.load``: parse and check one ``results.json``."""
    return Results.load(file)


def load_results(path: str | Path) -> Results:
    """The finished run at ``path``: a run directory or its ``results.json``."""
    path = Path(path)
    file = path / RESULTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise DataError(
            f"{path}: no {RESULTS_FILE} there; give a finished run's directory (is the run done?)"
        )
    return Results.load(file)


def find_results(paths: Iterable[str | Path]) -> list[Results]:
    """Every ``results.json`` at or under ``paths`` (each counted once), parsed and checked.

    A path that does not exist or holds no ``results.json`` is an error naming it.
    """
    found: list[Results] = []
    seen: set[Path] = set()
    for root in map(Path, paths):
        if not root.exists():
            raise DataError(f"{root}: no such run directory or {RESULTS_FILE} file")
        files = [root] if root.is_file() else sorted(root.rglob(RESULTS_FILE))
        if not files:
            raise DataError(f"{root}: no {RESULTS_FILE} at or under it; is the run finished?")
        for file in files:
            if file.resolve() in seen:
                continue
            seen.add(file.resolve())
            found.append(Results.load(file))
    if not found:
        raise DataError("no runs given")
    return found
