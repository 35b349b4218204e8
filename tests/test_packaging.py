"""The set-up the README promises is the set-up CI runs and the package declares."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text, flags=re.S)[:2]


def test_readme_opens_with_the_run_and_test_commands() -> None:
    run_command, test_command = readme_commands()
    assert run_command.endswith(".venv/bin/cmmm run")
    assert test_command.endswith(".venv/bin/pytest -q")
    for command in (run_command, test_command):
        # torch is installed first, pinned, so that Avalanche cannot pull a CUDA build over it.
        assert "-c constraints.txt torch==2.13.0" in command


def test_ci_runs_the_readme_test_command_with_the_shared_data() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert readme_commands()[1] in ci
    assert "shared/data" in ci and "CMMM_DATA_DIR" in ci


def test_console_script_and_pins() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["cmmm"] == "cmmm.cli:app"
    names = {re.split(r"[<>=\[ ]", dep)[0] for dep in project["dependencies"]}
    assert {
        "torch",
        "avalanche-lib",
        "transformers",
        "numpy",
        "torchmetrics",
        "tensorboard",
        "typer",
    } <= names
    pins = (REPO / "constraints.txt").read_text()
    assert re.search(r"^torch==\S+$", pins, flags=re.M)
    assert re.search(r"^torchvision==\S+$", pins, flags=re.M)


def test_test_extras_hold_what_the_tests_import() -> None:
    # CI installs .[test] on a fresh machine; the property tests need Hypothesis.
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    test = {re.split(r"[<>=\[ ]", dep)[0] for dep in extras["optional-dependencies"]["test"]}
    assert {"pytest", "ruff", "hypothesis"} <= test
