"""Finished runs as objects: ``load_results`` for one run, ``find_results`` for many.

A run is what ``cmmm run`` (or ``cmmm.run`` from Python) writes to ``<run dir>/results.json``;
``Results`` wraps that JSON unchanged (``.data``) and names its parts (``.aa``, ``.matrix``,
``.config``...). The CLI's ``summarize``, ``plot`` and the Python API all read runs through here,
so a file that one accepts, all accept.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmmm.errors import DataError

RESULTS_FILE = "results.json"
# Run settings added after results existed, with the value every earlier run had: an older
# results.json lacks them, and the run key leaves them out at these values so that finished runs
# keep their keys (and are reused) across versions.
ADDED_SETTINGS: dict[str, Any] = {
    "eval_patterns": "",
    "missing_rate": 1.0,
    "missing_mode": "pattern",
}


@dataclass(frozen=True)
class Results:
    """One finished run: where its ``results.json`` is and what it holds."""

    path: Path
    data: dict[str, Any]

    @property
    def run_dir(self) -> Path:
        return self.path.parent

    @property
    def config(self) -> dict[str, Any]:
        """The fully resolved configuration the run used (``RunConfig`` fields)."""
        return self.data["config"]

    @property
    def strategy(self) -> str:
        return str(self.data["strategy"]["name"])

    @property
    def stream(self) -> str:
        return str(self.config["stream"])

    @property
    def joint(self) -> bool:
        return bool(self.data["strategy"].get("joint", False))

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def aa(self) -> float | None:
        return self.data.get("aa")

    @property
    def fm(self) -> float | None:
        return self.data.get("fm")

    @property
    def bwt(self) -> float | None:
        return self.data.get("bwt")

    @property
    def task_names(self) -> list[str]:
        return [str(task["name"]) for task in self.data["stream"]["tasks"]]

    @property
    def matrix(self) -> np.ndarray:
        """Accuracy (%) on task ``i`` (column) after step ``j`` (row); NaN where not evaluated."""
        return np.array(
            [[np.nan if v is None else float(v) for v in row] for row in self.data["matrix"]],
            dtype=np.float64,
        )

    def __getitem__(self, key: str) -> Any:
        return self.data[key]


def read_results(file: Path) -> Results:
    """Parse and check one ``results.json``; a broken file is a ``DataError`` naming it."""
    try:
        data = json.loads(Path(file).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{file}: not a readable {RESULTS_FILE} ({error})") from None
    try:
        results = Results(Path(file), data)
        tasks = data["stream"]["tasks"]
        _ = (results.strategy, results.joint, results.seed, results.task_names, results.stream)
        values = results.matrix
    except (KeyError, TypeError, ValueError) as error:
        raise DataError(
            f"{file}: not a cmmm {RESULTS_FILE} (missing or malformed {error}); "
            "write it with `cmmm run`"
        ) from None
    steps = 1 if results.joint else len(tasks)
    if values.ndim != 2 or values.shape != (steps, len(tasks)):
        raise DataError(
            f"{file}: the accuracy matrix should be {steps} x {len(tasks)} "
            f"(steps x tasks), got {values.shape}"
        )
    return results


def load_results(path: str | Path) -> Results:
    """The finished run at ``path``: a run directory or its ``results.json``."""
    path = Path(path)
    file = path / RESULTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise DataError(
            f"{path}: no {RESULTS_FILE} there; give a finished run's directory (is the run done?)"
        )
    return read_results(file)


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
            found.append(read_results(file))
    if not found:
        raise DataError("no runs given")
    return found
