"""Property tests: the mfeat loader under damaged view files, in both layouts.

Each example writes a valid synthetic copy of one view (``mor``, 6 columns x 2000 rows; the
format is the same for every view) in the CSV or UCI layout, damages it, and loads. What the
damaged file should give is decided by the format alone, with a reference reading written here
from the format's description (``streams.mfeat``'s docstring): 2000 rows of D numbers (plus the
digit ``row // 200`` in a CSV, after a header of D + 1 fields), every number finite and within
float32. When the reference finds valid values the loader must return exactly them; otherwise it
must raise a one-line ``DataError`` naming the file. Any other exception fails the test.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import tempfile
from pathlib import Path

import numpy as np
from fuzzing import Damaged, Verdict, check_loader_outcome, damaged_bytes
from hypothesis import given
from hypothesis import strategies as st
from mfeat_fixtures import csv_bytes, synthetic_cells, uci_bytes

from streams.mfeat import NUM_ROWS, PER_CLASS, VIEW_DIMS, csv_name, load_mfeat, uci_name

VIEW = "mor"
DIM = VIEW_DIMS[VIEW]
LAYOUTS = ("csv", "uci")


@functools.cache
def valid_file(layout: str) -> bytes:
    rows = synthetic_cells((VIEW,), seed=3)[VIEW]
    return csv_bytes(VIEW, rows) if layout == "csv" else uci_bytes(rows)


def file_name(layout: str) -> str:
    return csv_name(VIEW) if layout == "csv" else uci_name(VIEW)


def _float32_finite(value: float) -> bool:
    with np.errstate(over="ignore"):
        return math.isfinite(value) and bool(np.isfinite(np.float32(value)))


def reference_values(content: bytes, layout: str) -> np.ndarray | None:
    """The (2000, D) values the format says ``content`` holds, or None when it is not valid."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if layout == "csv":
        try:
            rows = [row for row in csv.reader(io.StringIO(text, newline="")) if row]
        except csv.Error:
            return None
        if not rows or len(rows[0]) != DIM + 1:
            return None
        rows = rows[1:]
        width = DIM + 1
    else:
        lines = text.split("\n")
        rows = [r for r in (ln.replace("\t", " ").replace("\r", " ").split(" ") for ln in lines)]
        rows = [[f for f in r if f] for r in rows]
        rows = [r for r in rows if r]
        width = DIM
    if len(rows) != NUM_ROWS or any(len(row) != width for row in rows):
        return None
    values = np.empty((NUM_ROWS, DIM))
    for r, row in enumerate(rows):
        try:
            numbers = [float(cell) for cell in row]
        except ValueError:
            return None
        if layout == "csv" and numbers.pop() != r // PER_CLASS:
            return None
        if not all(_float32_finite(v) for v in numbers):
            return None
        values[r] = numbers
    return values


def check(layout: str, damaged: Damaged) -> None:
    expected = reference_values(damaged.content, layout)
    verdict = Verdict.INVALID if expected is None else Verdict.VALID
    judged = Damaged(damaged.content, damaged.what, verdict)
    with tempfile.TemporaryDirectory(prefix="cmmm-fuzz-") as tmp:
        root = Path(tmp) / "mfeat"
        root.mkdir()
        (root / file_name(layout)).write_bytes(damaged.content)
        dataset = check_loader_outcome(
            lambda: load_mfeat(Path(tmp), views=VIEW, log=lambda _: None),
            judged,
            file_name(layout),
        )
    if dataset is not None:
        assert expected is not None
        got = np.concatenate([split.features[VIEW][:, 0, :] for split in dataset.splits.values()])
        rows = np.concatenate(_split_rows())  # train, valid, test, as the splits come
        np.testing.assert_array_equal(got, expected[rows].astype(np.float32))


@functools.cache
def _split_rows() -> tuple[np.ndarray, ...]:
    from streams.mfeat import stratified_split

    return tuple(stratified_split().values())


def test_reference_reads_the_valid_files() -> None:
    for layout in LAYOUTS:
        assert reference_values(valid_file(layout), layout) is not None


@given(layout=st.sampled_from(LAYOUTS), data=st.data())
def test_byte_damage(layout: str, data: st.DataObject) -> None:
    check(layout, data.draw(damaged_bytes(valid_file(layout)), label="damage"))


CELL_TOKENS = st.one_of(
    st.sampled_from(
        ["nan", "NaN", "inf", "-inf", "1e999", "abc", "", " ", "1+2j", "True", "0x1f", "1_0"]
        + ["1,5", '"', "\uff11", "\x1c1", "0", "9", "3.0", "-0", "3.5e38", "3.4028234e38"]
        + ["1 2", "\t4", "5\r", "\n"]
    ),
    st.floats().map(repr),
    st.integers(-5, 30).map(str),
    st.text(max_size=6),
)


@given(
    layout=st.sampled_from(LAYOUTS),
    row=st.integers(0, NUM_ROWS),  # 0: the CSV's header
    column=st.integers(0, DIM),  # DIM: the CSV's label
    token=CELL_TOKENS,
)
def test_cell_replaced(layout: str, row: int, column: int, token: str) -> None:
    lines = valid_file(layout).decode().split("\n")
    line = row if layout == "csv" else min(row, NUM_ROWS - 1)
    separator = "," if layout == "csv" else " "
    fields = lines[line].split(",") if layout == "csv" else lines[line].split()
    fields[min(column, len(fields) - 1)] = token
    lines[line] = separator.join(fields)
    content = "\n".join(lines).encode("utf-8")
    check(
        layout, Damaged(content, f"line {line + 1} cell {column + 1} -> {token!r}", Verdict.VALID)
    )


@given(
    layout=st.sampled_from(LAYOUTS),
    # Often at a class boundary, where a swap moves a digit into the other class's rows.
    row=st.one_of(
        st.integers(1, NUM_ROWS - 1), st.sampled_from(range(PER_CLASS, NUM_ROWS, PER_CLASS))
    ),
    action=st.sampled_from(["drop", "duplicate", "swap"]),
)
def test_rows_moved(layout: str, row: int, action: str) -> None:
    lines = valid_file(layout).decode().split("\n")
    if action == "drop":
        del lines[row]
    elif action == "duplicate":
        lines.insert(row, lines[row])
    else:
        lines[row], lines[row - 1] = lines[row - 1], lines[row]
    check(layout, Damaged("\n".join(lines).encode(), f"{action} line {row + 1}", Verdict.VALID))


@given(row=st.integers(1, NUM_ROWS), label=st.sampled_from(["0", "3", "9", "9.0", "10", "-1"]))
def test_csv_label_changed(row: int, label: str) -> None:
    lines = valid_file("csv").decode().split("\n")
    fields = lines[row].split(",")
    fields[-1] = label
    lines[row] = ",".join(fields)
    check(
        "csv",
        Damaged("\n".join(lines).encode(), f"label of line {row + 1} -> {label}", Verdict.VALID),
    )
