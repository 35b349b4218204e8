"""Damaging valid files, and the property every loader must keep under damage.

The fuzz tests (``tests/**/test_fuzz_*.py``) start from small valid files in the published formats
(``tests/pickle_fixtures.py``, ``tests/mosi_fixtures.py``), damage one of them with the
strategies here, and hand the loader call to ``check_loader_outcome``: the loader either returns
a dataset, which is allowed only if the damage can have left the input valid, or raises one of
the project's error types whose one-line message names the damaged file and says what is wrong.
Any other exception escapes and fails the test with its traceback.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from hypothesis import strategies as st

from cmmm.errors import CmmmError, DataError

T = TypeVar("T")


class Verdict(enum.Enum):
    """What the damaged input can still be, as far as the file format says."""

    INVALID = "the input is no longer valid: loading must fail"
    MAYBE_VALID = "the input may still be valid (say, a changed digit): either outcome"
    VALID = "nothing the loader needs was touched: loading must succeed"


@dataclass(frozen=True)
class Damaged:
    """The bytes of a damaged file, what was done to them, and what they can still be."""

    content: bytes
    what: str
    verdict: Verdict
    # True when the loader must read exactly what it read from the valid file (say, a blank
    # line added to a CSV): a loaded dataset must then equal the undamaged one.
    same_data: bool = False

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        # How Hypothesis shows a failing example: by what was done, not by the bytes.
        printer.text(f"Damaged({self.what!r}, {self.verdict})")


# Big enough to hold a plausible header, small enough to keep examples fast.
MAX_RANDOM_BYTES = 1024


def random_bytes() -> st.SearchStrategy[Damaged]:
    """A file replaced by random bytes (no published file is this small)."""
    return st.binary(min_size=1, max_size=MAX_RANDOM_BYTES).map(
        lambda content: Damaged(
            content, f"replaced by {len(content)} random bytes", Verdict.INVALID
        )
    )


def emptied() -> st.SearchStrategy[Damaged]:
    return st.just(Damaged(b"", "emptied", Verdict.INVALID))


def truncated(valid: bytes) -> st.SearchStrategy[Damaged]:
    """``valid`` cut at a random offset (at least one byte lost)."""
    return st.integers(min_value=0, max_value=len(valid) - 1).map(
        lambda offset: Damaged(
            valid[:offset], f"truncated to {offset} of {len(valid)} bytes", Verdict.INVALID
        )
    )


def bytes_flipped(valid: bytes) -> st.SearchStrategy[Damaged]:
    """``valid`` with 1 to 8 bytes XOR-ed with a non-zero mask (so every one changes)."""
    flips = st.dictionaries(
        st.integers(0, len(valid) - 1), st.integers(1, 255), min_size=1, max_size=8
    )
    # Not a composite strategy: Hypothesis would show ``valid`` itself in a failure report.
    return flips.map(lambda masks: _flip(valid, masks))


def _flip(valid: bytes, masks: dict[int, int]) -> Damaged:
    content = bytearray(valid)
    for position, mask in masks.items():
        content[position] ^= mask
    flips = ", ".join(f"{position}^{mask:#04x}" for position, mask in sorted(masks.items()))
    return Damaged(bytes(content), f"bytes flipped at {flips}", Verdict.MAYBE_VALID)


def damaged_bytes(valid: bytes) -> st.SearchStrategy[Damaged]:
    """Any byte-level damage of ``valid``: random bytes, emptied, truncated or flipped."""
    return st.one_of(random_bytes(), emptied(), truncated(valid), bytes_flipped(valid))


def check_loader_outcome(
    load: Callable[[], T],
    damaged: Damaged,
    file_name: str,
    expected_error: type[CmmmError] = DataError,
) -> T | None:
    """Run ``load`` on damaged input; return its result, or None when it failed as it should."""
    try:
        result = load()
    except CmmmError as error:
        assert damaged.verdict is not Verdict.VALID, (
            f"{file_name} {damaged.what}: nothing the loader needs was damaged, yet it failed: "
            f"{error}"
        )
        assert isinstance(error, expected_error), (
            f"{file_name} {damaged.what}: expected a {expected_error.__name__}, got "
            f"{type(error).__name__}: {error}"
        )
        assert_reports_file_and_problem(str(error), file_name)
        return None
    assert damaged.verdict is not Verdict.INVALID, (
        f"{file_name} {damaged.what}: the input is invalid, yet it loaded"
    )
    return result


def assert_reports_file_and_problem(message: str, file_name: str) -> None:
    """One line, naming ``file_name``, and saying more than the file's path."""
    assert "\n" not in message and "\r" not in message, f"not one line: {message!r}"
    assert file_name in message, f"{file_name} not named in: {message}"
    # What is left without the paths must still be a sentence about the problem.
    words = re.findall(r"[A-Za-z]{2,}", " ".join(w for w in message.split() if "/" not in w))
    assert len(words) >= 3, f"says nothing about the problem: {message}"
