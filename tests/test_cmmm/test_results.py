"""``cmmm.results.Results``: what a run writes, every stored run read back unchanged, and a
one-line error naming the key for a file that is not a finished run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cmmm.errors import DataError
from cmmm.results import RESULTS_FILE, Results

REPO = Path(__file__).resolve().parents[2]
STORED = sorted((REPO / "experiments" / "results").rglob(RESULTS_FILE))


def test_stored_runs_are_there() -> None:
    # The round trip below would pass on an empty list.
    assert len(STORED) > 100


@pytest.mark.parametrize("path", STORED, ids=[str(p.relative_to(REPO)) for p in STORED])
def test_every_stored_run_loads_and_round_trips(path: Path) -> None:
    written = json.loads(path.read_text())
    results = Results.load(path)
    assert results.to_json() == written
    # Same keys in the same order: a rewritten file reads as the original.
    assert json.dumps(results.to_json()) == json.dumps(written)
    assert results.matrix_array().shape[1] == len(results.stream.tasks)


def test_a_run_writes_what_results_reads(finished_run: Results) -> None:
    file = finished_run.directory / RESULTS_FILE
    assert finished_run.dumps() == file.read_text()
    assert finished_run.strategy.name == "naive" and finished_run.strategy.trains is True
    assert finished_run.valid is not None and finished_run.held_out is None
    assert finished_run.task_codes == [task.code for task in finished_run.stream.tasks]
    assert set(finished_run.final_accuracies()) == set(finished_run.task_codes)


def drop(values: dict[str, Any], dotted: str) -> dict[str, Any]:
    copy = json.loads(json.dumps(values))
    *parents, last = dotted.split(".")
    target = copy
    for key in parents:
        target = target[key]
    del target[last]
    return copy


@pytest.mark.parametrize(
    "key", ["aa", "matrix", "config", "stream.tasks", "strategy.joint", "parameters.trainable"]
)
def test_a_missing_key_is_a_one_line_error_naming_it(finished_run: Results, key: str) -> None:
    broken = drop(finished_run.to_json(), key)
    with pytest.raises(DataError, match=f"missing or malformed '{key}'") as raised:
        Results.from_json(broken, Path("somewhere/results.json"))
    assert "\n" not in str(raised.value) and "somewhere/results.json" in str(raised.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [("aa", "high"), ("matrix", [["x"]]), ("wall_time_seconds", None), ("history", {})],
)
def test_a_malformed_value_is_an_error_naming_it(
    finished_run: Results, key: str, value: Any
) -> None:
    broken = {**finished_run.to_json(), key: value}
    with pytest.raises(DataError, match=f"malformed '{key}'"):
        Results.from_json(broken)
    with pytest.raises(DataError, match="not a cmmm results.json"):
        Results.from_json([1, 2])


def test_keys_older_runs_lack_are_optional(finished_run: Results) -> None:
    older = drop(drop(finished_run.to_json(), "valid"), "strategy.trains")
    results = Results.from_json(older)
    assert results.valid is None and results.strategy.trains is None
    assert results.strategy.trained  # every strategy before the zero-shot reference trained
    assert results.to_json() == older


def test_an_unreadable_file_is_an_error_naming_it(tmp_path: Path) -> None:
    file = tmp_path / RESULTS_FILE
    file.write_text("{not json")
    with pytest.raises(DataError, match=f"{file}: not a readable"):
        Results.load(file)
    with pytest.raises(DataError, match="not a readable"):
        Results.load(tmp_path / "absent.json")
