"""Missing cases beyond one pattern per task: per-sample missing rates, held-out patterns that no
task trains on (``--eval-patterns``), and ``ours``' rule for patterns it has not trained."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cmmm.cli import app
from cmmm.comparison import Comparison, _rows
from cmmm.data.missing_stream import build_stream, sample_patterns
from cmmm.data.patterns import all_patterns, nearest_pattern, parse_eval_patterns
from cmmm.errors import ConfigError
from cmmm.outcomes import RunOutcome as Outcome
from cmmm.results import Results
from cmmm.run_config import ADDED_SETTINGS
from cmmm.running import RunConfig, RunStopped, run
from strategies.ours import OursOptions, OursPrompts

MODALITIES = ("audio", "video", "text")
FULL = (True, True, True)
A_MISSING = (False, True, True)
ONLY_T = (False, False, True)
runner = CliRunner()


def quiet(_: str) -> None:
    pass


def presence_of(stream, dataset) -> torch.Tensor:
    """(N, M) presence masks of a PatternDataset's samples."""
    x, _ = dataset.tensors()
    return stream.layout.unpack(x)[1]


# --------------------------------------------------------------------------------------------
# Missing rates
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.7, 0.9, 1.0])
def test_pattern_mode_applies_the_pattern_to_an_exact_share(rate: float) -> None:
    variants, which = sample_patterns(A_MISSING, 101, rate, "pattern", np.random.default_rng(0))
    assert variants == [FULL, A_MISSING]
    assert int((which == 1).sum()) == round(rate * 101)
    assert set(np.unique(which)) <= {0, 1}


def test_split_mode_gives_each_missing_modality_an_equal_part() -> None:
    variants, which = sample_patterns(ONLY_T, 100, 0.7, "split", np.random.default_rng(0))
    # Lee et al.'s "missing both": each sample of the share loses one of the missing modalities.
    assert variants == [FULL, (False, True, True), (True, False, True)]
    assert [int((which == k).sum()) for k in range(3)] == [30, 35, 35]


def test_a_complete_pattern_has_nothing_to_drop() -> None:
    variants, which = sample_patterns(FULL, 10, 0.7, "split", np.random.default_rng(0))
    assert variants == [FULL] and not which.any()


@pytest.mark.parametrize(("rate", "mode"), [(1.5, "pattern"), (-0.1, "pattern"), (0.5, "some")])
def test_bad_missing_settings_are_refused(rate: float, mode: str) -> None:
    with pytest.raises(ConfigError, match="missing-"):
        RunConfig(missing_rate=rate, missing_mode=mode).resolved()


def test_stream_with_a_missing_rate_mixes_complete_and_pattern_samples(tiny_dataset) -> None:
    stream = build_stream(tiny_dataset, all_patterns(3), missing_rate=0.75, seed=3)
    for task in stream.tasks:
        for split in (task.train, task.test):
            presence = presence_of(stream, split)
            follows = (presence == torch.tensor(task.pattern, dtype=presence.dtype)).all(dim=1)
            complete = (presence == 1).all(dim=1)
            if all(task.pattern):
                assert complete.all()
                continue
            assert int(follows.sum()) == round(0.75 * len(split))
            assert bool((follows | complete).all())
            # Missing blocks are zero-filled exactly where the mask says so.
            features, _ = stream.layout.unpack(split.tensors()[0])
            for i, modality in enumerate(stream.layout.modalities):
                absent = presence[:, i] == 0
                assert features[modality][absent].abs().sum() == 0
                assert features[modality][~absent].abs().sum() > 0
        assert "(75%)" in task.name or all(task.pattern)


def test_which_samples_miss_depends_on_the_pattern_not_the_task_position(tiny_dataset) -> None:
    order = all_patterns(3)
    forward = build_stream(tiny_dataset, order, missing_rate=0.5, seed=1)
    backward = build_stream(tiny_dataset, order[::-1], missing_rate=0.5, seed=1)
    other_seed = build_stream(tiny_dataset, order, missing_rate=0.5, seed=2)
    by_pattern = {t.pattern: t for t in backward.tasks}
    for task in forward.tasks:
        mask = presence_of(forward, task.train)
        assert torch.equal(mask, presence_of(backward, by_pattern[task.pattern].train))
    moved = [
        not torch.equal(presence_of(forward, a.train), presence_of(other_seed, b.train))
        for a, b in zip(forward.tasks, other_seed.tasks, strict=True)
        if not all(a.pattern)
    ]
    assert any(moved)


def test_default_settings_keep_the_run_keys_of_earlier_versions() -> None:
    """A finished run made before these settings existed keeps its key (and is reused)."""
    config = RunConfig(stream="synthetic", strategy="ours", seed=2).resolved()
    before = {
        k: v
        for k, v in asdict(config).items()
        if k not in ("out", "data_dir", "cache_dir", "device", "threads", *ADDED_SETTINGS)
    }
    # Earlier versions evaluated in batches of 256 (and had no threads setting).
    before["eval_batch_size"] = 256
    old_key = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:10]
    assert config.key() == old_key
    for changed in ({"missing_rate": 0.7}, {"missing_mode": "split"}, {"eval_patterns": "t"}):
        assert RunConfig(stream="synthetic", strategy="ours", seed=2, **changed).key() != old_key


# --------------------------------------------------------------------------------------------
# Held-out patterns
# --------------------------------------------------------------------------------------------


def test_unseen_means_every_pattern_no_task_trains_on() -> None:
    trained = [FULL, A_MISSING, (True, True, False), (True, False, True)]
    held_out = parse_eval_patterns("unseen", MODALITIES, trained)
    assert held_out == [(True, False, False), (False, True, False), ONLY_T]
    assert parse_eval_patterns("t,a", MODALITIES, trained) == [ONLY_T, (True, False, False)]
    assert parse_eval_patterns("", MODALITIES, trained) == []


def test_held_out_patterns_are_refused_when_nothing_is_left_or_they_are_trained(
    tiny_dataset,
) -> None:
    with pytest.raises(ConfigError, match="none is left unseen"):
        parse_eval_patterns("unseen", MODALITIES, all_patterns(3))
    with pytest.raises(ConfigError, match="--eval-patterns: 'x' is not a pattern"):
        parse_eval_patterns("x", MODALITIES, [FULL])
    with pytest.raises(ConfigError, match="also a training task"):
        build_stream(tiny_dataset, [FULL, ONLY_T], held_out=[ONLY_T])


def test_nearest_pattern_prefers_fewest_differences_then_shared_modalities() -> None:
    trained = [FULL, A_MISSING, (True, True, False), (True, False, True)]
    # "only a" is one modality away from a·v and a·t, and shares audio with both: the first wins.
    assert nearest_pattern((True, False, False), trained) == (True, True, False)
    # "only t" is one away from v·t and a·t; both share text: v·t comes first.
    assert nearest_pattern(ONLY_T, trained) == A_MISSING
    assert nearest_pattern((True, False, False), [FULL, ONLY_T]) == FULL
    # Equal distance 2 from "only v": "v·t" shares video, "a" shares nothing.
    assert nearest_pattern((False, True, False), [(True, False, False), A_MISSING]) == A_MISSING


def prompts_of(form: str, rule: str) -> OursPrompts:
    options = OursOptions(unseen_patterns=rule, prompt_length=2, task_specific_form=form)
    return OursPrompts(MODALITIES, 4, options, {"m": (0,), "ta": (0,), "ts": (0,)})


def test_ours_routes_untrained_patterns_to_the_nearest_trained_set() -> None:
    prompts = prompts_of("per_pattern", "nearest")
    every = torch.arange(len(prompts.patterns))
    # Nothing trained yet: every pattern keeps its own set.
    assert torch.equal(prompts.task_specific_indices(every), every)
    for pattern in (FULL, A_MISSING):
        prompts.mark_seen(pattern)
    routed = prompts.task_specific_indices(every)
    expected = [
        prompts.pattern_index[nearest_pattern(p, [FULL, A_MISSING])] for p in prompts.patterns
    ]
    assert routed.tolist() == expected
    assert routed[prompts.pattern_index[ONLY_T]] == prompts.pattern_index[A_MISSING]
    assert routed[prompts.pattern_index[A_MISSING]] == prompts.pattern_index[A_MISSING]
    # The seen set is model state: a copy loaded from the state dict routes the same way.
    copy = prompts_of("per_pattern", "nearest")
    copy.load_state_dict(prompts.state_dict())
    assert torch.equal(copy.task_specific_indices(every), routed)


@pytest.mark.parametrize("form", ["per_pattern", "compositional"])
def test_own_rule_keeps_each_patterns_own_set(form: str) -> None:
    prompts = prompts_of(form, "own")
    prompts.mark_seen(FULL)
    every = torch.arange(len(prompts.patterns))
    assert torch.equal(prompts.task_specific_indices(every), every)


def test_run_scores_held_out_patterns_after_every_step(tiny_config, tmp_path: Path) -> None:
    config = tiny_config(
        strategy="ours",
        task_order="avt,vt,at,av",
        eval_patterns="unseen",
        strategy_options={"layers_m": [0], "layers_ta": [0], "layers_ts": [0]},
    )
    results = run(config, log=quiet)
    held_out = results["held_out"]
    assert [t["code"] for t in held_out["tasks"]] == ["a", "v", "t"]
    matrix = np.array(held_out["matrix"], dtype=float)
    assert matrix.shape == (4, 3) and not np.isnan(matrix).any()
    assert held_out["aa"] == pytest.approx(matrix[-1].mean())
    assert [t["acc"] for t in held_out["per_task_final"]] == pytest.approx(matrix[-1])
    # The four training tasks' AA and FM are computed as without held-out patterns.
    assert len(results["matrix"]) == 4 and results["fm"] is not None
    plain = run(tiny_config(**{**asdict(config), "eval_patterns": ""}), log=quiet)
    assert plain["matrix"] == results["matrix"] and "held_out" not in plain


def test_held_out_scores_survive_a_resume(tiny_config) -> None:
    config = tiny_config(strategy="naive", task_order="avt,a,t", eval_patterns="v,at")
    expected = run(config, log=quiet)
    shutil.rmtree(expected["run_dir"])
    with pytest.raises(RunStopped):
        run(config, log=quiet, stop_after=2)
    resumed = run(config, log=quiet, resume=True)
    assert resumed["held_out"] == expected["held_out"]


def test_compare_table_shows_the_held_out_accuracy(tiny_config) -> None:
    config = tiny_config(strategy="naive", task_order="avt,vt", eval_patterns="t")
    result = run(config, log=quiet)
    path = Path(result["run_dir"]) / "results.json"
    outcome = Outcome("naive", 0, "ran", path, Results.load(path))
    table = Comparison("synthetic", [outcome], _rows(["naive"], [outcome])).markdown()
    assert "AA held-out (%)" in table
    assert f"{result['held_out']['aa']:.2f}" in table
    assert "eval_patterns=t" in table


def test_cli_refuses_unseen_when_every_pattern_is_trained(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["run", "--eval-patterns", "unseen", "--out", str(tmp_path / "runs")]
        + ["--cache-dir", str(tmp_path / "cache")],
    )
    assert result.exit_code == 2
    assert "none is left unseen" in result.output
    result = runner.invoke(app, ["run", "--missing-rate", "2", "--dry-run"])
    assert result.exit_code == 2 and "--missing-rate must lie in [0, 1]" in result.output


def test_experiment_table_shows_held_out_cases_and_missing_rates(tmp_path: Path) -> None:
    from cmmm.experiments import load_experiment, run_experiment

    path = tmp_path / "held_out.toml"
    path.write_text(
        """
title = "held out"
stream = "synthetic"
seeds = [0]

[base]
strategy = "naive"
epochs = 1
pretrain_epochs = 1
task_order = "avt,vt"
eval_patterns = "unseen"
stream_options = { n_train = 48, n_valid = 16, n_test = 32 }
backbone_options = { layers = 1, self_layers = 1 }

[grid]
missing_rate = [0.5, 1.0]

[[rows]]
label = "naive"
"""
    )
    overrides = {"out": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache")}
    experiment = load_experiment(path, overrides)
    table, _ = run_experiment(experiment, tmp_path / "runs", log=quiet)
    assert "AA held-out (%)" in table and "held-out cases" in table
    results = {
        json.loads(p.read_text())["config"]["missing_rate"]: json.loads(p.read_text())
        for p in (tmp_path / "runs").glob("*/results.json")
    }
    assert sorted(results) == [0.5, 1.0]
    for rate, result in results.items():
        held_out = result["held_out"]
        cases = ", ".join(
            f"{t['code']} {f['acc']:.1f}"
            for t, f in zip(held_out["tasks"], held_out["per_task_final"], strict=True)
        )
        assert f"naive missing_rate={rate} | " in table
        assert cases in table
        assert result["stream"]["missing_rate"] == rate
