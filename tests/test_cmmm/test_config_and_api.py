"""Config files (`cmmm run --config/--dry-run`), `cmmm list`, the Python API, and TensorBoard
logs of several runs side by side."""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict
from pathlib import Path

import pytest
from conftest import TINY_BACKBONE_OPTIONS, TINY_STREAM_OPTIONS, make_tiny_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

import cmmm
from cmmm.cli import app
from cmmm.config_files import config_to_toml, read_config_file
from cmmm.data.catalog import STREAMS
from cmmm.errors import ConfigError, DataError
from cmmm.running import RunConfig
from cmmm.strategy import STRATEGIES

runner = CliRunner()


def tiny_flags(root: Path) -> list[str]:
    """The command-line form of make_tiny_config (the nested options come from a file)."""
    return [
        "--epochs",
        "1",
        "--pretrain-epochs",
        "1",
        "--out",
        str(root / "runs"),
        "--cache-dir",
        str(root / "cache"),
        "--data-dir",
        str(root / "data"),
        "--device",
        "cpu",
    ]


def write_tiny_toml(root: Path, **overrides: object) -> Path:
    path = root / "tiny.toml"
    path.write_text(config_to_toml(make_tiny_config(root, **overrides)))
    return path


# --------------------------------------------------------------------------------------------
# Config files
# --------------------------------------------------------------------------------------------


def test_toml_round_trips_a_config_with_nested_options(tmp_path: Path) -> None:
    config = make_tiny_config(
        tmp_path,
        strategy="ours",
        strategy_options={"lam": 0.5, "layers_m": [0, 1], "order": "ta,m,ts", "prompt_dim": None},
        task_order="avt,t,a",
    )
    text = config_to_toml(config, header="a header\nof two lines")
    assert text.startswith("# a header\n# of two lines\n")
    (tmp_path / "c.toml").write_text(text)
    values = read_config_file(tmp_path / "c.toml")
    again = RunConfig.from_mapping(values, "c.toml")
    expected = asdict(config)
    # TOML has no null: a None option is left out, i.e. takes its (None) default.
    del expected["strategy_options"]["prompt_dim"]
    assert asdict(again) == expected
    assert again.stream_options == TINY_STREAM_OPTIONS
    assert again.backbone_options == TINY_BACKBONE_OPTIONS


def test_dry_run_prints_toml_that_config_reads_back(tmp_path: Path) -> None:
    toml_path = write_tiny_toml(tmp_path, strategy="ours", strategy_options={"lam": 0.25})
    first = runner.invoke(app, ["run", "--config", str(toml_path), "--dry-run"])
    assert first.exit_code == 0, first.output
    printed = tomllib.loads(first.stdout)
    expected = make_tiny_config(tmp_path, strategy="ours", strategy_options={"lam": 0.25})
    assert RunConfig.from_mapping(printed, "stdout") == expected.resolved()
    assert f"run key {expected.resolved().key()}" in first.stdout
    assert "lam = 0.25" in first.stdout and "tau = 0.5" in first.stdout  # options in effect
    (tmp_path / "printed.toml").write_text(first.stdout)
    second = runner.invoke(app, ["run", "--config", str(tmp_path / "printed.toml"), "--dry-run"])
    assert second.exit_code == 0, second.output
    assert second.stdout == first.stdout
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_command_line_flags_override_the_file(tmp_path: Path) -> None:
    toml_path = write_tiny_toml(tmp_path, strategy="ours", strategy_options={"lam": 0.25})
    result = runner.invoke(
        app, ["run", "--config", str(toml_path), "--seed", "7", "-o", "tau=0.1", "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    printed = tomllib.loads(result.stdout)
    assert printed["seed"] == 7
    # ours' changed default (trainable_head) is written into the resolved configuration.
    assert printed["strategy_options"] == {"lam": 0.25, "tau": 0.1, "trainable_head": "pattern"}
    assert printed["epochs"] == 1  # from the file, not the flag's default
    # Another strategy on the command line does not inherit the file's strategy options.
    other = runner.invoke(
        app, ["run", "--config", str(toml_path), "--strategy", "ewc", "--dry-run"]
    )
    assert other.exit_code == 0, other.output
    assert tomllib.loads(other.stdout)["strategy_options"] == {}


def test_config_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('stream = "synthetic"\nepochz = 3\n')
    with pytest.raises(ConfigError, match=r"bad\.toml.*epochz"):
        read_config_file(bad)
    result = runner.invoke(app, ["run", "--config", str(bad), "--dry-run"])
    assert result.exit_code == 2 and "epochz" in result.output and "Traceback" not in result.output
    broken = tmp_path / "broken.toml"
    broken.write_text("stream = \n")
    with pytest.raises(ConfigError, match=r"broken\.toml: not valid TOML"):
        read_config_file(broken)
    with pytest.raises(ConfigError, match="cannot read"):
        read_config_file(tmp_path / "absent.toml")
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('strategy = "ours"\n[strategy_options]\nnot_an_option = 1\n')
    result = runner.invoke(app, ["run", "--config", str(wrong), "--dry-run"])
    assert result.exit_code == 2 and "not_an_option" in result.output


# --------------------------------------------------------------------------------------------
# The Python API, the CLI, and results.json agree
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    toml_path = write_tiny_toml(root, strategy="naive")
    result = runner.invoke(app, ["run", "--config", str(toml_path)])
    assert result.exit_code == 0, result.output
    [run_dir] = (root / "runs").iterdir()
    return root, run_dir


def test_load_results_returns_what_the_cli_wrote(cli_run: tuple[Path, Path]) -> None:
    _, run_dir = cli_run
    written = json.loads((run_dir / "results.json").read_text())
    for path in (run_dir, run_dir / "results.json", str(run_dir)):
        loaded = cmmm.load_results(path)
        assert loaded.to_json() == written
    assert loaded.aa == written["aa"] and loaded.fm == written["fm"]
    assert loaded.matrix == written["matrix"] == loaded.matrix_array().tolist()
    assert loaded.strategy.name == "naive" and loaded.config["stream"] == "synthetic"
    assert loaded.directory == run_dir
    assert loaded.task_names[0] == written["stream"]["tasks"][0]["name"]


def test_api_run_gives_the_cli_result_for_the_same_config(
    cli_run: tuple[Path, Path], tmp_path: Path
) -> None:
    root, run_dir = cli_run
    from_cli = cmmm.load_results(run_dir)
    # The same configuration (from the file) in a fresh place: the same numbers.
    results = cmmm.run(root / "tiny.toml", log=None, out=str(tmp_path / "runs"))
    assert isinstance(results, cmmm.Results)
    assert results.to_json() == json.loads((results.directory / "results.json").read_text())
    assert results.matrix == from_cli.matrix
    assert results.directory.name == run_dir.name  # same resolved config, same key
    # Keyword settings and a RunConfig work too; a repeated run from results.json is equal.
    again = cmmm.run(run_dir / "results.json", log=None, out=str(tmp_path / "again"))
    assert again.matrix == from_cli.matrix


def test_api_rejects_what_the_cli_rejects(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown settings"):
        cmmm.run(make_tiny_config(tmp_path), epochz=2)
    with pytest.raises(ConfigError, match="unknown strategy"):
        cmmm.run(make_tiny_config(tmp_path), strategy="nope", log=None)
    with pytest.raises(DataError, match="no results.json"):
        cmmm.load_results(tmp_path)
    with pytest.raises(TypeError, match="RunConfig"):
        cmmm.run(42)


# --------------------------------------------------------------------------------------------
# cmmm list
# --------------------------------------------------------------------------------------------


def test_list_shows_every_strategy_and_stream_with_options() -> None:
    result = runner.invoke(app, ["list", "strategies"])
    assert result.exit_code == 0, result.output
    names = [line.split()[0] for line in result.stdout.splitlines() if not line.startswith(" ")]
    assert names == STRATEGIES.names()
    assert "prompt_length: 16  prompt length L in tokens" in result.stdout
    assert "mem_size: 250  total replay buffer size" in result.stdout
    result = runner.invoke(app, ["list", "streams"])
    assert result.exit_code == 0, result.output
    names = [line.split()[0] for line in result.stdout.splitlines() if not line.startswith(" ")]
    assert names == STREAMS.names()
    assert "valid_videos:" in result.stdout and "epochs 5" in result.stdout


# --------------------------------------------------------------------------------------------
# TensorBoard over several runs
# --------------------------------------------------------------------------------------------


def test_tensorboard_logs_of_two_runs_compare(cli_run: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = cli_run
    runs = root / "runs"
    # The tiny backbone has one cross-modal layer: every prompt type goes there.
    layers = {"layers_m": [0], "layers_ta": [0], "layers_ts": [0]}
    cmmm.run(root / "tiny.toml", log=None, strategy="ours", strategy_options={"lam": 0.5, **layers})
    dirs = sorted(p / "tensorboard" for p in runs.iterdir())
    assert len(dirs) == 2
    for directory in dirs:
        accumulator = EventAccumulator(str(directory))
        accumulator.Reload()
        tags = accumulator.Tags()
        assert {"acc/avt", "acc/t", "aa_so_far", "fm", "train_loss/all"} <= set(tags["scalars"])
        assert [e.step for e in accumulator.Scalars("acc/t")] == list(range(7))
        hparams = accumulator.PluginTagToContent("hparams")
        assert "_hparams_/session_start_info" in hparams
        session = hparams["_hparams_/session_start_info"].decode("latin-1")
        assert "strategy" in session and "run_key" in session
    ours_session = next(EventAccumulator(str(d)) for d in dirs if "ours" in d.parent.name)
    ours_session.Reload()
    info = ours_session.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    assert b"option.lam" in info and b"option.tau" in info
