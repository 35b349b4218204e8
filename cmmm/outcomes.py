"""One run in a table of many: read it when it has finished, else run it now.

Every command that tabulates runs over rows and seeds (``cmmm compare``, experiments, sweeps,
tuning, the modality benchmark) gets each run's ``RunOutcome`` here, so a finished run is
reused the same way everywhere, an interrupted one continues from its checkpoint, and a failed
one is reported while the others go on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cmmm import running
from cmmm.checkpoints import CHECKPOINT_FILE
from cmmm.errors import DataError
from cmmm.results import RESULTS_FILE, Results
from cmmm.run_config import RunConfig

# "missing": not finished and not run, because only finished runs were asked for.
Status = Literal["reused", "ran", "failed", "missing"]


@dataclass
class RunOutcome:
    strategy: str
    seed: int
    status: Status
    results_path: Path
    result: Results | None = None
    error: str | None = None


def read_results(path: Path) -> Results | None:
    """A finished run's results, or None when the file is absent, unreadable or not a complete
    ``results.json`` (then the run is run again)."""
    try:
        return Results.load(path)
    except DataError:
        return None


def run_or_reuse(
    config: RunConfig, label: str, log: Callable[[str], None], run_missing: bool = True
) -> RunOutcome:
    """The run's results: read from ``run_dir()/results.json`` when present, else run now.

    A failure is returned as a ``failed`` outcome (and logged) so that the caller's other runs
    go on; an unreadable results file is run again. With ``run_missing`` False an unfinished
    run is only reported (``missing``).
    """
    run_dir = config.run_dir()  # hashes the configuration: once
    path = run_dir / RESULTS_FILE
    result = read_results(path)
    if result is not None:
        log(f"{label}: reusing {path}")
        return RunOutcome(config.strategy, config.seed, "reused", path, result)
    if not run_missing:
        log(f"{label}: not finished; not run (--finished-only)")
        return RunOutcome(config.strategy, config.seed, "missing", path)
    if path.exists():
        log(f"{label}: {path} is unreadable; running again")
    # An interrupted run continues from its checkpoint (running.run refuses to start it over).
    resume = (run_dir / CHECKPOINT_FILE).exists()
    log(f"{label}: {'resuming' if resume else 'running'}")
    try:
        # Looked up at call time so that tests can replace cmmm.running.run.
        record = running.run(config, log=lambda message: log(f"  {message}"), resume=resume)
        result = Results.from_json(record, path)
    except Exception as error:  # noqa: BLE001 - reported; the other runs go on
        message = f"{type(error).__name__}: {error}"
        log(f"{label}: FAILED ({message})")
        return RunOutcome(config.strategy, config.seed, "failed", path, None, message)
    return RunOutcome(config.strategy, config.seed, "ran", path, result)
