"""The contract every registered strategy keeps, checked for each one by name.

A strategy registered today or tomorrow (a plug-in included) is in ``STRATEGIES.names()``; each
is built on the tiny synthetic stream, trained one experience, its ``options()`` fed back to its
own factory, and a run of two tasks interrupted after the first and resumed from the checkpoint
must write the results of the uninterrupted run. A strategy that breaks one of these fails here
under its own name, before a long experiment finds out.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from cmmm.checkpoints import CHECKPOINT_FILE, read_checkpoint
from cmmm.discovery import load_plugins
from cmmm.results import RESULTS_FILE, Results
from cmmm.running import RunConfig, RunStopped, prepare, run
from cmmm.strategy import STRATEGIES

load_plugins()
NAMES = STRATEGIES.names()

# Options that put every prompt on the tiny backbone's one cross-modal layer (the defaults
# assume the paper's five). Every other strategy runs with its defaults.
ON_LAYER_0: dict[str, dict[str, Any]] = {
    "aoept": {"layers": "0"},
    "codaprompt": {"layers": "0"},
    "dualprompt": {"g_layers": "0", "e_layers": "0"},
    "memprompt": {"layers": "0"},
    "promma": {"layers": "0"},
    "ours": {"layers_m": [0], "layers_ta": [0], "layers_ts": [0]},
    "ours-compositional": {"layers_m": [0], "layers_ta": [0], "layers_ts": [0]},
    "joint-ours": {"layers_m": [0], "layers_ta": [0], "layers_ts": [0]},
}
# Two tasks: the least that has a task after the checkpoint to continue with.
TASK_ORDER = "1,2"
# The only results that may differ between two runs of one configuration.
TIMING_KEYS = ("wall_time_seconds", "train_time_seconds")


def quiet(_: str) -> None:
    pass


def comparable(results: Results) -> str:
    """The results without timings, as canonical JSON (NaN compares equal to itself as text)."""
    record = {k: v for k, v in results.to_json().items() if k not in TIMING_KEYS}
    return json.dumps(record, sort_keys=True)


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_config_at) -> Path:
    """One directory for every strategy, its pre-training cache warmed once."""
    path = tmp_path_factory.mktemp("contract")
    prepare(tiny_config_at(path, task_order=TASK_ORDER).resolved(), quiet)
    return path


def config_of(root: Path, tiny_config_at: Any, name: str) -> RunConfig:
    return tiny_config_at(
        root, strategy=name, task_order=TASK_ORDER, strategy_options=ON_LAYER_0.get(name, {})
    )


def test_every_tiny_option_names_a_registered_strategy() -> None:
    assert set(ON_LAYER_0) <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_options_round_trip_through_the_factory(name: str) -> None:
    factory = STRATEGIES.get(name).factory
    for given in ({}, ON_LAYER_0.get(name, {})):
        options = factory(**given).options()
        # What results.json records must rebuild the same strategy: directly and through JSON.
        assert factory(**options).options() == options
        assert factory(**json.loads(json.dumps(options))).options() == options


@pytest.mark.parametrize("name", NAMES)
def test_builds_and_trains_one_experience(root: Path, tiny_config_at: Any, name: str) -> None:
    config = config_of(root, tiny_config_at, name).resolved()
    prepared = prepare(config, quiet)
    strategy = STRATEGIES.get(name).factory(**config.strategy_options)
    template = strategy.build(prepared.strategy_context(config, plugins=[]))
    model = template.model
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    first = next(iter(prepared.stream.avalanche_benchmark().train_stream))
    template.train(first)
    after = model.state_dict()
    changed = [k for k in before if k in after and not torch.equal(before[k], after[k])]
    # A strategy that trains must change its model in one experience; zeroshot must not.
    assert bool(changed) == strategy.trains, (name, strategy.trains, changed[:5])
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())


@pytest.mark.parametrize("name", NAMES)
def test_resume_after_the_first_task_reproduces_the_run(
    root: Path, tiny_config_at: Any, name: str
) -> None:
    config = config_of(root, tiny_config_at, name)
    run_dir = config.resolved().run_dir()
    expected = Results.from_json(run(config, log=quiet))
    # The interrupted run uses the same directory (paths in the results are the same), so the
    # uninterrupted one is moved aside first.
    aside = root / "uninterrupted" / run_dir.name
    aside.parent.mkdir(exist_ok=True)
    shutil.move(run_dir, aside)
    if expected.strategy.joint:
        # One step: nothing to stop after. The finished run's checkpoint, restored and written
        # out, must give the same results.
        shutil.copytree(aside, run_dir)
        (run_dir / RESULTS_FILE).unlink()
    else:
        with pytest.raises(RunStopped):
            run(config, log=quiet, stop_after=1)
        assert not (run_dir / RESULTS_FILE).exists()
        assert read_checkpoint(run_dir / CHECKPOINT_FILE).completed_steps == 1
    resumed = Results.from_json(run(config, log=quiet, resume=True))
    assert resumed.matrix == expected.matrix
    assert comparable(resumed) == comparable(expected)
    assert comparable(Results.load(run_dir / RESULTS_FILE)) == comparable(resumed)
