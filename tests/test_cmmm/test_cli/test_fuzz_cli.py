"""Property tests at the command line: a corrupt data directory, bad names, bad task orders.

Whatever is wrong, ``cmmm`` must end with exit code 2 and one ``error:`` line on stderr that
names the file (or lists the valid names, or says why the task order is wrong), never with a
traceback.
"""

from __future__ import annotations

import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from fuzzing import Damaged, Verdict, emptied, random_bytes, truncated
from hypothesis import given, settings
from hypothesis import strategies as st
from mosi_fixtures import write_tiny_mosi
from pickle_fixtures import mmsa_content, mult_content
from typer.testing import CliRunner

from cmmm.cli import app
from cmmm.data.patterns import all_patterns, parse_task_order
from cmmm.errors import ConfigError
from streams.mosi import LOADER_FILES, MOSI_DIRNAME

runner = CliRunner()

SMALL_SPLITS = {"train": 9, "valid": 4, "test": 4}
# (stream, file under the data directory, writer of a valid data directory)
PICKLE_CASES: list[tuple[str, str, Callable[[], object]]] = [
    ("mosi-pkl", "mosi/mosi_data.pkl", lambda: mult_content("mosi", sizes=SMALL_SPLITS)),
    ("iemocap", "iemocap/iemocap_data.pkl", lambda: mult_content("iemocap", sizes=SMALL_SPLITS)),
    ("mosi-pkl", "mosi/aligned_50.pkl", lambda: mmsa_content(sizes=SMALL_SPLITS)),
    ("sims", "sims/unaligned_39.pkl", lambda: mmsa_content(sizes=SMALL_SPLITS)),
]
CASES = [(stream, file) for stream, file, _ in PICKLE_CASES] + [
    ("mosi", f"{MOSI_DIRNAME}/{file}") for file in LOADER_FILES
]
# Directory names that rich would take for style tags ("[data]") or refuse ("[/]").
DATA_DIR_NAMES = ["data", "[data]", "da[/]ta", "[bold]x[/bold]"]


def write_valid_data(data_dir: Path, stream: str, file: str) -> None:
    """A valid data directory for ``stream`` holding ``file``."""
    if stream == "mosi":
        write_tiny_mosi(data_dir)
        return
    (content,) = [content for s, f, content in PICKLE_CASES if (s, f) == (stream, file)]
    (data_dir / file).parent.mkdir(parents=True)
    (data_dir / file).write_bytes(pickle.dumps(content()))


@st.composite
def corrupt_file(draw: st.DrawFn, valid: bytes, is_pickle: bool) -> Damaged:
    """Damage that always leaves the file invalid (so no run starts training)."""
    half = valid[: len(valid) // 2]
    kinds = [random_bytes(), emptied(), truncated(half)]
    if is_pickle:
        # A dict with other keys: the message lists the keys found, text from the file.
        keys = st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=4)
        kinds.append(
            keys.map(
                lambda k: Damaged(
                    pickle.dumps(dict.fromkeys(k, 1)), f"dict with keys {k}", Verdict.INVALID
                )
            )
        )
    return draw(st.one_of(kinds))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_line_error(result, *fragments: str) -> str:
    """Exit code 2, no traceback, exactly one ``error:`` line on stderr holding ``fragments``."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    # typer.Exit, not the original exception, ended the command.
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# CLI runs are slower than loader calls: a fifth of the profile's examples.
@settings(max_examples=max(4, settings.default.max_examples // 5))
@given(
    case=st.sampled_from(CASES),
    dir_name=st.sampled_from(DATA_DIR_NAMES),
    data=st.data(),
)
def test_corrupt_data_directory_ends_in_one_line_naming_the_file(
    case: tuple[str, str], dir_name: str, data: st.DataObject
) -> None:
    stream, file = case
    with tempfile.TemporaryDirectory(prefix="cmmm-fuzz-") as tmp:
        data_dir = Path(tmp) / dir_name
        write_valid_data(data_dir, stream, file)
        path = data_dir / file
        damaged = data.draw(corrupt_file(path.read_bytes(), file.endswith(".pkl")), label="damage")
        path.write_bytes(damaged.content)
        result = runner.invoke(
            app,
            [
                "run",
                "--stream",
                stream,
                "--data-dir",
                str(data_dir),
                "--cache-dir",
                str(Path(tmp) / "cache"),
                "--out",
                str(Path(tmp) / "runs"),
                "--epochs",
                "1",
                "--pretrain-epochs",
                "1",
                "--device",
                "cpu",
            ],
        )
    # Every loader message names a path inside the data directory, printed as it is.
    assert_one_line_error(result, path.name, str(data_dir))


# --------------------------------------------------------------------------------------------
# Unknown names and task orders


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["compare", "--stream", "nosuch"], ["unknown stream 'nosuch'", "synthetic", "mosi"]),
        (["compare", "--strategies", "naive,nosuch"], ["unknown strategy 'nosuch'", "naive"]),
        (["benchmark", "overhead", "--stream", "nosuch"], ["unknown stream 'nosuch'", "sims"]),
        (["run", "--stream", "[/nosuch]"], ["unknown stream '[/nosuch]'", "synthetic"]),
        (["run", "--strategy", "[bold]x"], ["unknown strategy '[bold]x'", "naive"]),
    ],
    ids=["compare-stream", "compare-strategy", "benchmark-stream", "run-stream", "run-strategy"],
)
def test_unknown_names_list_the_valid_ones(
    tmp_path: Path, monkeypatch, args: list[str], fragments: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, [*args, "--cache-dir", str(tmp_path / "cache")])
    assert_one_line_error(result, *fragments)
    # Refused before anything was run or written.
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("order", "why"),
    [
        ("avt,vt,avt", "'avt' appears twice; each missing case is one task"),
        ("1,8", "task 8 does not exist; use 1..7"),
        (" , ", "names no task"),
        ("avt,x", "'x' is not a pattern; write the present modalities as one of avt, vt"),
        ("\u00b2", "is not a pattern"),
    ],
    ids=["repeat", "out-of-range", "empty", "unknown-code", "superscript-digit"],
)
def test_invalid_task_order_says_why(tmp_path: Path, monkeypatch, order: str, why: str) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(
        app,
        [
            "run",
            "--task-order",
            order,
            "--out",
            str(tmp_path / "runs"),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
    )
    assert_one_line_error(result, "--task-order", why)
    assert not (tmp_path / "runs").exists()


AVT = ("audio", "video", "text")
TASK_ORDER_ITEMS = st.one_of(
    st.sampled_from(["avt", "vt", "tv", "av", "at", "a", "v", "t", "x", "aa", "", " "]),
    st.integers(-2, 9).map(str),
    st.text(max_size=4),
    st.text(alphabet="0123456789", min_size=5, max_size=5000),
)


@given(items=st.lists(TASK_ORDER_ITEMS, max_size=9), separator=st.sampled_from([",", ", "]))
def test_any_task_order_parses_or_says_why(items: list[str], separator: str) -> None:
    spec = separator.join(items)
    try:
        order = parse_task_order(spec, AVT)
    except ConfigError as error:
        message = str(error)
        assert message.startswith("--task-order") and "\n" not in message, message
        return
    # A valid order: distinct patterns of the default stream.
    assert len(set(order)) == len(order) and set(order) <= set(all_patterns(3))
