"""The documentation shows commands that exist and links that lead somewhere.

Every ``cmmm ...`` command in a code block of README.md, docs/*.md or experiments/README.md must
name a real command path (``cmmm <group> <command>``) whose ``--help`` succeeds, and every option
it shows must be one that command declares. Nothing is run: only ``--help`` is invoked, so this
takes about a second. Every relative link (and image) must point to an existing file, and a
``#fragment`` into a Markdown file to one of its headings."""

from __future__ import annotations

import functools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from cmmm.cli import app

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [
    REPO / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
    REPO / "experiments" / "README.md",
]

# Code blocks that hold shell commands; Python and TOML blocks are not read.
NON_SHELL_LANGUAGES = {"python", "toml", "json"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SHELL_SEPARATORS = {"&&", "||", ";", "|", "&"}
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@dataclass(frozen=True)
class ShownCommand:
    source: str  # file:line
    words: list[str]  # everything after the program name `cmmm`

    def __str__(self) -> str:
        return f"{self.source}: cmmm {' '.join(self.words)}"


def code_blocks(text: str) -> list[tuple[int, str, list[str]]]:
    """(first line number, language, lines) of every fenced code block."""
    blocks, current, language, start = [], None, "", 0
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("```"):
            if current is None:
                current, language, start = [], line[3:].strip().lower(), number + 1
            else:
                blocks.append((start, language, current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def cmmm_invocations(line: str) -> list[list[str]]:
    """The words after ``cmmm`` of every invocation on one shell line (``a && b``, ``a | b``,
    ``VAR=x cmmm ...``, ``.venv/bin/cmmm ...``); comments are dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        tokens = list(lexer)
    except ValueError:  # an unbalanced quote: not a shell command
        return []
    segments: list[list[str]] = [[]]
    for token in tokens:
        if token in SHELL_SEPARATORS:
            segments.append([])
        else:
            segments[-1].append(token)
    found = []
    for words in segments:
        while words and ENV_ASSIGNMENT.match(words[0]):
            words = words[1:]
        if words and (words[0] == "cmmm" or words[0].endswith("/bin/cmmm")):
            found.append(words[1:])
    return found


def shown_commands(files: list[Path], root: Path = REPO) -> list[ShownCommand]:
    commands = []
    for path in files:
        for start, language, lines in code_blocks(path.read_text()):
            if language in NON_SHELL_LANGUAGES:
                continue
            joined, first = "", start
            for offset, line in enumerate(lines):
                if not joined:
                    first = start + offset
                if line.rstrip().endswith("\\"):  # continued on the next line
                    joined += line.rstrip()[:-1] + " "
                    continue
                joined += line
                for words in cmmm_invocations(joined):
                    source = f"{path.relative_to(root)}:{first}"
                    commands.append(ShownCommand(source, words))
                joined = ""
    return commands


def command_path(words: list[str]) -> tuple[list[str], list[str]]:
    """Split the words into the command path (group and command names, up to the first option
    or argument) and the rest. A word under a group is taken as a command name even when the
    group has no such command, so that a made-up command fails its ``--help``."""
    current: Any = root_command()
    path: list[str] = []
    for word in words:
        if word.startswith("-") or not is_group(current):
            break
        path.append(word)
        current = current.commands.get(word)
    return path, words[len(path) :]


@functools.cache
def root_command() -> Any:
    return typer.main.get_command(app)


@functools.cache
def help_of(path: tuple[str, ...]) -> tuple[int, str]:
    """Exit code and output of ``cmmm <path> --help`` (each path is asked once)."""
    result = CliRunner().invoke(app, [*path, "--help"])
    return result.exit_code, result.output


def is_group(command: Any) -> bool:
    # Typer ships its own copy of click, so the group is recognised by what it holds.
    return isinstance(getattr(command, "commands", None), dict)


def resolve(path: list[str]) -> Any:
    """The command object at ``path`` (None when there is none)."""
    current: Any = root_command()
    for word in path:
        if not is_group(current):
            return None
        current = current.commands.get(word)
    return current


def shown_options(rest: list[str]) -> list[str]:
    """The option names among the remaining words (``--out=x`` -> ``--out``, ``[--from`` ->
    ``--from``)."""
    names = []
    for word in rest:
        word = word.strip("[]")
        if word.startswith("-") and word != "-":
            names.append(word.split("=", 1)[0])
    return names


def check_command(command: ShownCommand) -> list[str]:
    """What is wrong with one shown command (empty when nothing is)."""
    path, rest = command_path(command.words)
    exit_code, output = help_of(tuple(path))
    if exit_code != 0:
        output = " ".join(output.split())
        return [f"{command}: `cmmm {' '.join(path)} --help` exited {exit_code}: {output}"]
    target = resolve(path)
    if is_group(target):
        return [f"{command}: `cmmm {' '.join(path)}` is a group, not a command"]
    declared = {"--help"}
    for parameter in target.params:
        declared.update(parameter.opts)
        declared.update(parameter.secondary_opts)
    return [
        f"{command}: `cmmm {' '.join(path)}` has no option {name}"
        for name in shown_options(rest)
        if name not in declared
    ]


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (lower case, punctuation dropped, spaces
    to hyphens; repeated headings get -1, -2, ...)."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not re.match(r"#+ ", line):
            continue
        title = line.lstrip("#").strip().lower()
        slug = re.sub(r"[^\w\- ]", "", title).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def broken_links(path: Path, root: Path = REPO) -> list[str]:
    without_code = "\n".join(_outside_code_blocks(path.read_text().splitlines()))
    problems = []
    for target in LINK.findall(without_code):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file_part, _, fragment = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}: ({target})"
        if not destination.exists():
            problems.append(f"{where} points to a missing file")
        elif fragment and destination.suffix == ".md":
            if fragment not in heading_anchors(destination.read_text()):
                problems.append(f"{where}: {destination.name} has no heading #{fragment}")
    return problems


def _outside_code_blocks(lines: list[str]) -> list[str]:
    kept, in_code = [], False
    for line in lines:
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code:
            kept.append(line)
    return kept


def test_the_docs_show_commands() -> None:
    commands = shown_commands(DOC_FILES)
    groups = {tuple(command_path(c.words)[0][:1]) for c in commands}
    # The README alone shows run, compare, experiment, summarize, plot, benchmark, data, sweep
    # and list: if extraction broke, far fewer would be found.
    assert len(commands) > 40
    assert {("run",), ("compare",), ("sweep",), ("data",), ("list",)} <= groups


def test_every_shown_command_exists_with_the_options_it_shows() -> None:
    problems = [problem for c in shown_commands(DOC_FILES) for problem in check_command(c)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "block",
    [
        "cmmm frobnicate --stream mosi",
        "cmmm data frobnicate mosi",
        "CMMM_DATA_DIR=x cmmm run --no-such-option 3",
        "cmmm list",
    ],
)
def test_a_command_that_does_not_exist_is_caught(block: str, tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(f"Text.\n\n```bash\n{block}\n```\n")
    (command,) = shown_commands([page], root=tmp_path)
    assert check_command(command)


def test_commands_are_found_behind_variables_continuations_and_chains() -> None:
    assert cmmm_invocations("A=1 B=2 cmmm run --seed 2  # a comment") == [["run", "--seed", "2"]]
    assert cmmm_invocations("pip install x && .venv/bin/cmmm run") == [["run"]]
    assert cmmm_invocations("python -m cmmm.listing") == []
    model = "$(python -c 'import m; print(m.p())')"
    quoted = f'X=1 cmmm data encode-text mosi --model "{model}"'
    assert cmmm_invocations(quoted) == [["data", "encode-text", "mosi", "--model", model]]
    assert cmmm_invocations("cmmm/        core: CLI, backbone") == []  # a folder, not a command
    assert command_path(["data", "download", "mosi", "--from", "x"]) == (
        ["data", "download"],
        ["mosi", "--from", "x"],
    )
    assert command_path(["plot", "runs/", "--kind", "curves"]) == (
        ["plot"],
        ["runs/", "--kind", "curves"],
    )


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_to_existing_files(path: Path) -> None:
    problems = broken_links(path)
    assert not problems, "\n".join(problems)


def test_a_broken_link_is_caught(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# A heading\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[gone](missing.png) [fine](other.md#a-heading) [no anchor](other.md#nowhere) "
        "[web](https://example.org/x)\n"
    )
    problems = broken_links(page, root=tmp_path)
    assert len(problems) == 2
    assert "missing.png" in problems[0] and "#nowhere" in problems[1]
