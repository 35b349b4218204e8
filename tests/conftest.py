"""Shared fixtures: tiny run settings, a tiny synthetic stream, the shared real-data directory.

Every output and cache goes under pytest's ``tmp_path``; nothing is written into the repository
or the shared data directory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings

REPO = Path(__file__).resolve().parents[1]

# On a two-core machine that is already busy, PyTorch's default of one intra-op thread per core
# makes these small models 20-30 times slower (threads wait for each other); one thread keeps a
# tiny run at a few seconds.
torch.set_num_threads(1)

# Property tests (tests/**/test_fuzz_*.py). Every example writes files and runs a loader, so
# examples are slow by Hypothesis' standards: no deadline, and no health check about it.
# "ci" (the default) draws the same examples on every run (derandomize, no example database): a
# red CI run is reproduced by running the same command, and a green one stays green until the
# code or the tests change. "thorough" draws ten times as many, fresh ones each run, and keeps
# failing examples in .hypothesis/ to replay them first next time; select it with
# HYPOTHESIS_PROFILE=thorough.
_FUZZ_SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("ci", _FUZZ_SETTINGS, max_examples=40, derandomize=True, database=None)
settings.register_profile("thorough", _FUZZ_SETTINGS, max_examples=400)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

TINY_STREAM_OPTIONS: dict[str, Any] = {"n_train": 64, "n_valid": 16, "n_test": 32}
TINY_BACKBONE_OPTIONS: dict[str, Any] = {"layers": 1, "self_layers": 1}


def resolve_shared_data_dir() -> Path:
    """CMMM_DATA_DIR (relative paths are relative to the repository), else <repo>/../shared/data."""
    configured = Path(os.environ.get("CMMM_DATA_DIR", REPO.parent / "shared" / "data"))
    return configured if configured.is_absolute() else (REPO / configured).resolve()


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The real data directory; skips the test when it is absent."""
    path = resolve_shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"data directory {path} absent (set CMMM_DATA_DIR)")
    return path


def make_tiny_config(root: Path, **overrides: Any) -> Any:
    """A ``RunConfig`` that finishes in a few seconds and writes only under ``root``.

    Keyword arguments override any field; ``stream_options``/``backbone_options`` replace the
    tiny ones entirely when given.
    """
    from cmmm.running import RunConfig

    settings: dict[str, Any] = {
        "stream": "synthetic",
        "epochs": 1,
        "pretrain_epochs": 1,
        "stream_options": dict(TINY_STREAM_OPTIONS),
        "backbone_options": dict(TINY_BACKBONE_OPTIONS),
        "out": str(root / "runs"),
        "cache_dir": str(root / "cache"),
        "data_dir": str(root / "data"),
        "device": "cpu",
    }
    settings.update(overrides)
    return RunConfig(**settings)


@pytest.fixture
def tiny_config(tmp_path: Path) -> Callable[..., Any]:
    """``make_tiny_config`` rooted at the test's ``tmp_path``."""

    def make(**overrides: Any) -> Any:
        return make_tiny_config(tmp_path, **overrides)

    return make


@pytest.fixture(scope="session")
def tiny_config_at() -> Callable[..., Any]:
    """``make_tiny_config`` itself, for module-scoped fixtures with their own root."""
    return make_tiny_config


@pytest.fixture(scope="session")
def tiny_dataset():
    """The tiny synthetic regression dataset (64/16/32 samples)."""
    from streams.synthetic import SyntheticSpec, make_synthetic

    return make_synthetic(SyntheticSpec(**TINY_STREAM_OPTIONS))


# Real finished runs that tests of readers (summaries, plots, tables) read back: what `cmmm run`
# writes today, not JSON written by hand that may drift from it. Three tasks keep them fast;
# two seeds of naive give a spread, lwf a second strategy, joint a one-row matrix.
FINISHED_RUNS: tuple[tuple[str, int], ...] = (("naive", 0), ("naive", 1), ("lwf", 0), ("joint", 0))
FINISHED_TASK_ORDER = "1,2,3"


@pytest.fixture(scope="session")
def finished_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory holding the run directories of ``FINISHED_RUNS``, each run once a session.

    Read them, never write into them: every test of the session shares them.
    """
    from cmmm.running import run

    root = tmp_path_factory.mktemp("finished")
    for strategy, seed in FINISHED_RUNS:
        config = make_tiny_config(
            root, strategy=strategy, seed=seed, task_order=FINISHED_TASK_ORDER
        )
        run(config, log=lambda _: None)
    return root / "runs"


@pytest.fixture(scope="session")
def finished_run(finished_runs: Path) -> Any:
    """naive, seed 0, of ``finished_runs``, as ``cmmm.results.Results``."""
    from cmmm.results import RESULTS_FILE, Results

    [file] = finished_runs.glob(f"synthetic-naive-seed0-*/{RESULTS_FILE}")
    return Results.load(file)


def results_like(template: Any, config: Any, **changes: Any) -> dict[str, Any]:
    """A real run's ``results.json`` (``template``, a ``Results``) as if ``config`` had run:
    its configuration, directory and strategy name, plus ``changes`` to top-level keys (made-up
    scores). For tests that fake ``cmmm.running.run`` with numbers chosen in advance. The
    template's validation and held-out scores are left out: they would not match made-up test
    scores (pass them in ``changes`` to have them)."""
    import dataclasses

    resolved = config.resolved()
    strategy = dataclasses.replace(template.strategy, name=resolved.strategy)
    faked = dataclasses.replace(
        template,
        config=dataclasses.asdict(resolved),
        run_dir=str(resolved.run_dir()),
        strategy=strategy,
        valid=None,
        held_out=None,
        path=None,
    )
    return {**faked.to_json(), **changes}
