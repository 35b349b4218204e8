"""One continual run end to end: results.json, TensorBoard, the pre-training cache, errors."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import cmmm.running
from cmmm.backbone import MulT
from cmmm.data.catalog import STREAMS
from cmmm.data.missing_stream import layout_of
from cmmm.errors import ConfigError, DatasetNotFoundError
from cmmm.evaluation import average_accuracy_so_far, backward_transfer, forgetting_measure
from cmmm.pretraining import backbone_config_for
from cmmm.run_config import options_at_default
from cmmm.running import RunConfig, run
from streams.catalog import SYNTHETIC_DEFAULTS
from streams.synthetic import SyntheticSpec, make_synthetic

REPO = Path(__file__).resolve().parents[2]
CODES = ["avt", "vt", "av", "at", "a", "v", "t"]


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def naive_run(tmp_path_factory, tiny_config_at):
    """A tiny naive run whose epochs per task come from the stream's defaults (5)."""
    root = tmp_path_factory.mktemp("naive")
    config = tiny_config_at(root, epochs=None)
    logs: list[str] = []
    results = run(config, log=logs.append)
    return root, config, results, logs


def load_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    accumulator = EventAccumulator(str(directory))
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


# --------------------------------------------------------------------------------------------
# results.json
# --------------------------------------------------------------------------------------------


def test_results_json_is_written_in_the_run_dir(naive_run) -> None:
    root, config, results, _ = naive_run
    resolved = config.resolved()
    run_dir = Path(results["run_dir"])
    assert run_dir == resolved.run_dir()
    assert run_dir.parent == root / "runs"
    assert run_dir.name == f"synthetic-naive-seed0-{resolved.key()}"
    on_disk = json.loads((run_dir / "results.json").read_text())
    # results.json is strict JSON and holds exactly what run() returned.
    assert on_disk == json.loads(json.dumps(results, allow_nan=False))
    # Nothing else was written beside the run directory and the cache.
    assert sorted(p.name for p in root.iterdir()) == ["cache", "runs"]
    assert [p.name for p in (root / "runs").iterdir()] == [run_dir.name]


def test_config_is_resolved(naive_run) -> None:
    _, config, results, _ = naive_run
    recorded = results["config"]
    assert recorded["epochs"] == SYNTHETIC_DEFAULTS["epochs"] == 5
    assert recorded["pretrain_epochs"] == 1
    assert recorded == asdict(config.resolved())
    assert None not in recorded.values()
    assert results["pretraining"]["epochs"] == 1


def test_config_resolution_rules() -> None:
    assert RunConfig(stream="synthetic").resolved().epochs == SYNTHETIC_DEFAULTS["epochs"]
    assert RunConfig(stream="mosi").resolved().epochs == 30
    assert RunConfig(stream="mosi").resolved().pretrain_epochs == 30
    assert RunConfig(stream="synthetic", epochs=2).resolved().epochs == 2
    with pytest.raises(ConfigError, match="--epochs"):
        RunConfig(epochs=0).resolved()
    with pytest.raises(ConfigError, match="--lr"):
        RunConfig(lr=0.0).resolved()
    with pytest.raises(ConfigError, match="--device"):
        RunConfig(device="tpu").resolved()


def test_key_ignores_where_results_go_but_not_what_changes_them() -> None:
    base = RunConfig(epochs=1, pretrain_epochs=1)
    assert base.key() == RunConfig(epochs=1, pretrain_epochs=1, out="x", cache_dir="y").key()
    assert base.key() != RunConfig(epochs=1, pretrain_epochs=1, seed=1).key()
    assert base.key() != RunConfig(epochs=1, pretrain_epochs=1, task_order="7,1").key()


def test_an_option_written_at_its_default_is_the_run_without_it() -> None:
    def key(strategy: str, **options: object) -> str:
        return RunConfig(strategy=strategy, strategy_options=options).resolved().key()

    assert key("ours", prompt_length=16, lam=0.1) == key("ours")
    assert key("ours", prompt_length=8) != key("ours")
    assert key("ours", prompt_length=8, lam=0.1) == key("ours", prompt_length=8)
    assert key("er-250", mem_size=250) == key("er-250")  # a preset's own default
    assert key("er-250", mem_size=500) != key("er-250")
    # A changed default is still told apart: the old value names the stored runs' key, the new
    # one is hashed explicitly (cmmm.running.changed_options).
    assert key("ours", trainable_head="pattern") == key("ours")
    assert key("ours", trainable_head="none") != key("ours")
    # An option that does not build changes the run (its error comes when it is built).
    assert options_at_default("ewc", {"mode": "online"}) == set()
    assert options_at_default("no-such-strategy", {"x": 1}) == set()


def test_environment_record(naive_run) -> None:
    _, _, results, _ = naive_run
    environment = results["environment"]
    versions = environment["versions"]
    assert versions["torch"] == torch.__version__
    assert versions["numpy"] == np.__version__
    for package in ("cmmm", "avalanche-lib", "torchmetrics"):
        assert versions[package], package
    assert environment["python"]
    if (REPO / ".git").exists():
        commit = environment["commit"]
        assert re.fullmatch(r"[0-9a-f]{40}", commit), commit
        # The commit the run was made from (HEAD, or its ancestor if someone committed since).
        ancestor = subprocess.run(
            ["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=REPO, check=False
        )
        assert ancestor.returncode == 0
    else:
        assert "commit" in environment


def test_matrix_and_summaries(naive_run) -> None:
    _, _, results, _ = naive_run
    matrix = np.asarray(results["matrix"], dtype=np.float64)
    assert matrix.shape == (7, 7)
    assert np.isfinite(matrix).all()
    assert ((matrix >= 0) & (matrix <= 100)).all()
    assert results["metric_family"] == "mosi"
    assert results["aa"] == pytest.approx(matrix[-1].mean())
    assert results["fm"] == pytest.approx(forgetting_measure(matrix))
    assert results["bwt"] == pytest.approx(backward_transfer(matrix))
    assert results["aa_so_far"] == pytest.approx(average_accuracy_so_far(matrix))
    assert len(results["history"]) == 7
    for step, entry in enumerate(results["history"]):
        assert entry["step"] == step
        assert [m["acc"] for m in entry["per_task"]] == pytest.approx(matrix[step].tolist())


def test_per_task_final(naive_run) -> None:
    _, _, results, _ = naive_run
    names = [task["name"] for task in results["stream"]["tasks"]]
    assert [task["code"] for task in results["stream"]["tasks"]] == CODES
    final = results["per_task_final"]
    assert [entry["task"] for entry in final] == names
    assert [entry["acc"] for entry in final] == pytest.approx(results["matrix"][-1])
    for entry in final:
        assert {"acc", "f1", "mae", "pearson", "n"} <= set(entry)
        assert entry["n"] == 32


def test_stream_record(naive_run) -> None:
    _, _, results, _ = naive_run
    stream = results["stream"]
    assert stream["name"] == "synthetic"
    assert stream["modalities"] == ["audio", "video", "text"]
    assert stream["task_data"] == "full"
    assert [t["train_samples"] for t in stream["tasks"]] == [64] * 7
    assert [t["test_samples"] for t in stream["tasks"]] == [32] * 7
    assert stream["tasks"][1]["pattern"] == [False, True, True]
    assert results["strategy"] == {"name": "naive", "joint": False, "trains": True, "options": {}}


def test_parameters_and_times(naive_run) -> None:
    _, _, results, _ = naive_run
    dataset = make_synthetic(SyntheticSpec(n_train=64, n_valid=16, n_test=32))
    reference = MulT(layout_of(dataset), backbone_config_for(dataset, layers=1, self_layers=1))
    expected = sum(p.numel() for p in reference.parameters())
    parameters = results["parameters"]
    # naive fine-tunes the whole backbone.
    assert parameters["total"] == parameters["backbone"] == expected
    assert parameters["trainable"] == expected
    assert parameters["trainable_share_of_backbone"] == 1.0
    assert results["wall_time_seconds"] > results["train_time_seconds"] > 0
    assert results["device"] == "cpu"


def test_tensorboard_scalars(naive_run) -> None:
    _, _, results, _ = naive_run
    tb_dir = Path(results["run_dir"]) / "tensorboard"
    assert any(p.name.startswith("events.out.tfevents") for p in tb_dir.iterdir())
    scalars = load_scalars(tb_dir)
    matrix = results["matrix"]
    for column, code in enumerate(CODES):
        events = scalars[f"acc/{code}"]
        assert [step for step, _ in events] == list(range(7))
        assert [value for _, value in events] == pytest.approx(
            [row[column] for row in matrix], abs=1e-4
        )
    assert [v for _, v in scalars["aa_so_far"]] == pytest.approx(results["aa_so_far"], abs=1e-4)
    assert scalars["fm"][-1][1] == pytest.approx(results["fm"], abs=1e-4)
    # 5 epochs per task (the stream default) for 7 tasks.
    assert len(scalars["train_loss/all"]) == 35
    assert len(scalars["train_loss/step0"]) == 5


def test_pretraining_record_and_log(naive_run) -> None:
    root, _, results, logs = naive_run
    record = results["pretraining"]
    assert record["cached"] is False
    checkpoint = Path(record["checkpoint"])
    assert checkpoint.is_file()
    assert checkpoint.parent == root / "cache" / "pretrained"
    assert record["key"] in checkpoint.name
    assert any("pre-training" in line for line in logs)


# --------------------------------------------------------------------------------------------
# The pre-training cache
# --------------------------------------------------------------------------------------------


def test_pretrained_checkpoint_is_cached_and_reused(tiny_config, monkeypatch) -> None:
    states: list[dict[str, torch.Tensor]] = []
    real = cmmm.running.pretrained_backbone

    def recording(*args, **kwargs):
        model, record = real(*args, **kwargs)
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model, record

    monkeypatch.setattr(cmmm.running, "pretrained_backbone", recording)

    first = run(tiny_config(), log=quiet)["pretraining"]
    second = run(tiny_config(), log=quiet)["pretraining"]
    assert first["cached"] is False
    assert second["cached"] is True
    assert second["checkpoint"] == first["checkpoint"]
    assert second["valid_loss"] == pytest.approx(first["valid_loss"])
    # The weights' fingerprint is the same whether the backbone was trained or read back.
    assert len(first["weights_sha256"]) == 64
    assert second["weights_sha256"] == first["weights_sha256"]
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])

    # Another strategy of the same stream and seed starts from the same weights.
    joint = run(tiny_config(strategy="joint"), log=quiet)["pretraining"]
    assert joint["cached"] is True
    assert joint["checkpoint"] == first["checkpoint"]

    # A changed seed is a new checkpoint with different weights.
    reseeded = run(tiny_config(seed=1), log=quiet)["pretraining"]
    assert reseeded["cached"] is False
    assert reseeded["checkpoint"] != first["checkpoint"]
    assert Path(first["checkpoint"]).is_file() and Path(reseeded["checkpoint"]).is_file()
    assert any(not torch.equal(states[0][k], states[-1][k]) for k in states[0])
    assert reseeded["weights_sha256"] != first["weights_sha256"]


# --------------------------------------------------------------------------------------------
# Joint training, determinism, classification
# --------------------------------------------------------------------------------------------


def test_joint_gives_one_row(tiny_config) -> None:
    results = run(tiny_config(strategy="joint"), log=quiet)
    matrix = results["matrix"]
    assert len(matrix) == 1 and len(matrix[0]) == 7
    assert results["fm"] is None
    assert results["bwt"] is None
    assert results["aa"] == pytest.approx(float(np.mean(matrix[0])))
    assert results["strategy"]["joint"] is True
    assert len(results["history"]) == 1
    scalars = load_scalars(Path(results["run_dir"]) / "tensorboard")
    assert "fm" not in scalars
    assert [step for step, _ in scalars["acc/avt"]] == [0]


def test_same_seed_twice_gives_the_same_matrix(naive_run, tmp_path, tiny_config_at) -> None:
    # A fresh root: pre-training runs again, nothing is shared with the first run.
    _, config, first, _ = naive_run
    again = run(tiny_config_at(tmp_path, epochs=None), log=quiet)
    assert again["pretraining"]["cached"] is False
    assert again["config"]["seed"] == config.seed
    assert again["matrix"] == first["matrix"]
    assert again["history"] == first["history"]
    assert again["pretraining"]["valid_loss"] == first["pretraining"]["valid_loss"]


def test_synthetic_cls_runs_with_cross_entropy(tiny_config, monkeypatch) -> None:
    criteria: list[torch.nn.Module] = []
    real = cmmm.running.task_criterion

    def recording(dataset):
        criterion = real(dataset)
        criteria.append(criterion)
        return criterion

    monkeypatch.setattr(cmmm.running, "task_criterion", recording)
    results = run(tiny_config(stream="synthetic-cls"), log=quiet)
    assert [type(c) for c in criteria] == [torch.nn.CrossEntropyLoss]
    assert results["stream"]["name"] == "synthetic-cls"
    assert results["metric_family"] == "classification"
    matrix = np.asarray(results["matrix"], dtype=np.float64)
    assert matrix.shape == (7, 7)
    assert ((matrix >= 0) & (matrix <= 100)).all()
    assert results["fm"] == pytest.approx(forgetting_measure(matrix))
    # Four-way logits: the checkpoint's output layer has four rows.
    saved = torch.load(results["pretraining"]["checkpoint"], weights_only=True)
    assert saved["state_dict"]["out_layer.weight"].shape[0] == 4
    assert {"acc", "f1", "n"} <= set(results["per_task_final"][0])
    assert "mae" not in results["per_task_final"][0]


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_unknown_strategy_lists_valid_names(tiny_config, tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown strategy 'nosuch'") as info:
        run(tiny_config(strategy="nosuch"), log=quiet)
    assert "naive" in str(info.value) and "joint" in str(info.value)
    assert not (tmp_path / "runs").exists()


def test_unknown_stream_lists_valid_names(tiny_config, tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown stream 'nosuch'") as info:
        run(tiny_config(stream="nosuch"), log=quiet)
    for name in STREAMS.names():
        assert name in str(info.value)
    assert {"synthetic", "synthetic-cls", "mosi"} <= set(STREAMS.names())
    assert not (tmp_path / "runs").exists()


def test_unknown_stream_option_is_a_config_error(tiny_config) -> None:
    with pytest.raises(ConfigError, match="n_samples"):
        run(tiny_config(stream_options={"n_samples": 3}), log=quiet)


def test_unknown_backbone_option_is_a_config_error(tiny_config) -> None:
    with pytest.raises(ConfigError, match="depth"):
        run(tiny_config(backbone_options={"depth": 3}), log=quiet)


def test_bad_task_order_is_a_config_error(tiny_config) -> None:
    with pytest.raises(ConfigError, match="appears twice"):
        run(tiny_config(task_order="1,1"), log=quiet)


def test_mosi_with_empty_data_dir_says_how_to_download(tiny_config, tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetNotFoundError) as info:
        run(
            tiny_config(stream="mosi", data_dir=str(empty), stream_options={}),
            log=quiet,
        )
    message = str(info.value)
    assert str(empty) in message
    assert "cmmm data download mosi" in message
    assert list(empty.iterdir()) == []
    assert not (tmp_path / "runs").exists()


def test_zero_pretraining_epochs_leave_the_seeded_backbone(tiny_config) -> None:
    """``--pretrain-epochs 0``: no pre-training, no validation loss, and the run still finishes."""
    messages: list[str] = []
    results = run(tiny_config(pretrain_epochs=0), log=messages.append)
    assert results["pretraining"]["valid_loss"] is None
    assert any("best valid loss none (0 epochs)" in m for m in messages)
    assert results["aa"] is not None
