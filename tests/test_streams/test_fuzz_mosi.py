"""Property tests: the CMU-MOSI loader under damaged CSVs, label file and cache.

Each example writes the small valid MOSI copy of ``tests/mosi_fixtures.py`` (bc-LSTM CSVs and
the CMU SDK ``.csd`` label file) and a valid cache of it, damages one file, and loads. Either a
valid dataset comes back (only if the damage can have left the data valid) or a ``DataError``
naming the damaged file; any other exception fails the test. A damaged cache must never fail a
load nor change what it returns, and a failed load must leave the existing cache as it was.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from fuzzing import Damaged, Verdict, check_loader_outcome, damaged_bytes
from hypothesis import given
from hypothesis import strategies as st
from mosi_fixtures import write_tiny_mosi

from cmmm.data.dataset import MultimodalDataset
from streams.mosi import (
    CSD_DATA_GROUP,
    FEATURE_DIMS,
    LABELS_CSD,
    LOADER_FILES,
    MODALITIES,
    SOURCE_SPLITS,
    TRANSCRIPTS,
    index_file,
    load_mosi,
    modality_file,
)

CSV_FILES = tuple(f for f in LOADER_FILES if f.endswith(".csv"))
INDEX_FILES = {index_file(split) for split in SOURCE_SPLITS}
# How many fields a row of each CSV has (the audio rows end with one more, empty field).
COLUMNS = {
    TRANSCRIPTS: 4,
    **{index_file(s): 1 + FEATURE_DIMS["text"] for s in SOURCE_SPLITS},
    **{modality_file(m, s): FEATURE_DIMS[m] + 1 for m in MODALITIES for s in SOURCE_SPLITS},
}
VALID_VIDEOS = 1


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class CleanMosi:
    """The valid copy: its files' bytes, its cache file, and what it loads to."""

    files: dict[str, bytes]
    cache_name: str
    cache: bytes
    dataset: MultimodalDataset


@functools.cache
def clean_mosi() -> CleanMosi:
    # A function, not a fixture, so that Hypothesis does not print it with every failing example.
    with tempfile.TemporaryDirectory(prefix="cmmm-fuzz-") as tmp:
        data_dir, cache_dir = Path(tmp) / "data", Path(tmp) / "cache"
        write_tiny_mosi(data_dir)
        files = {f: (data_dir / "mosi" / f).read_bytes() for f in LOADER_FILES}
        dataset = load_mosi(data_dir, cache_dir=cache_dir, valid_videos=VALID_VIDEOS, log=_quiet)
        (cache_file,) = cache_dir.iterdir()
        return CleanMosi(files, cache_file.name, cache_file.read_bytes(), dataset)


@contextmanager
def mosi_copy(replaced: dict[str, bytes], cache: bytes | None = None) -> Iterator[Path]:
    """A fresh directory with ``data/mosi`` (clean files, some replaced) and ``cache/``."""
    clean = clean_mosi()
    with tempfile.TemporaryDirectory(prefix="cmmm-fuzz-") as tmp:
        root = Path(tmp)
        for name, content in {**clean.files, **replaced}.items():
            path = root / "data" / "mosi" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        (root / "cache").mkdir()
        (root / "cache" / clean.cache_name).write_bytes(clean.cache if cache is None else cache)
        yield root


def _load(root: Path, log=_quiet) -> MultimodalDataset:
    return load_mosi(root / "data", cache_dir=root / "cache", valid_videos=VALID_VIDEOS, log=log)


def assert_same_data(loaded: MultimodalDataset, clean: MultimodalDataset) -> None:
    for name, split in clean.splits.items():
        got = loaded.splits[name]
        for modality in MODALITIES:
            assert got.features[modality].dtype == split.features[modality].dtype
            np.testing.assert_array_equal(got.features[modality], split.features[modality])
        assert got.labels.dtype == split.labels.dtype
        np.testing.assert_array_equal(got.labels, split.labels)
        np.testing.assert_array_equal(got.groups, split.groups)
        for note in ("utterance_ids", "binary_labels"):
            np.testing.assert_array_equal(loaded.notes[note][name], clean.notes[note][name])
    assert loaded.notes["sign_agreement"] == clean.notes["sign_agreement"]


def check_damaged_source(file: str, damaged: Damaged) -> None:
    """Load with ``file`` damaged: the property, and nothing already written is lost."""
    clean = clean_mosi()
    with mosi_copy({file: damaged.content}) as root:
        dataset = check_loader_outcome(lambda: _load(root), damaged, Path(file).name)
        cache_dir = root / "cache"
        # The cache of the undamaged files is still there, byte for byte; a failed load wrote
        # nothing (not even a temporary file).
        assert (cache_dir / clean.cache_name).read_bytes() == clean.cache
        if dataset is None:
            assert os.listdir(cache_dir) == [clean.cache_name]
        # The loader never writes into the data directory.
        for name, content in {**clean.files, file: damaged.content}.items():
            assert (root / "data" / "mosi" / name).read_bytes() == content, name
    if dataset is not None and damaged.same_data:
        assert_same_data(dataset, clean.dataset)


# --------------------------------------------------------------------------------------------
# The CSVs


def _rows(content: bytes, columns: int) -> list[list[str]] | None:
    """The rows the loader sees: blank lines skipped, one trailing empty field dropped."""
    try:
        text = content.decode("utf-8")
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except (UnicodeDecodeError, csv.Error):
        return None
    return [row[:-1] if len(row) == columns + 1 and row[-1] == "" else row for row in rows if row]


def _with_csv_verdict(file: str, valid: bytes, damaged: Damaged) -> Damaged:
    """Byte damage that leaves the rows the loader reads as they were must load."""
    if file in COLUMNS and _rows(damaged.content, COLUMNS[file]) == _rows(valid, COLUMNS[file]):
        return Damaged(damaged.content, damaged.what + " (same rows)", Verdict.VALID, True)
    return damaged


def _write_rows(rows: list[list[str]]) -> bytes:
    # As the published files: every field quoted, CRLF line ends.
    out = io.StringIO(newline="")
    writer = csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="\r\n")
    writer.writerows(rows)
    return out.getvalue().encode("utf-8")


def _finite_number(text: str) -> float | None:
    """``text`` as a number the loader can keep (finite, also as float32), else None."""
    try:
        value = float(text)
    except ValueError:
        return None
    with np.errstate(over="ignore"):
        return value if math.isfinite(value) and np.isfinite(np.float32(value)) else None


CELL_TOKENS = st.one_of(
    st.sampled_from(
        ["nan", "NaN", "inf", "-inf", "Infinity", "1e999", "-1e999", "abc", "", " ", "1+2j"]
        + ["True", "0x1f", "1_0", "1d5", "1,5", '"', "\uff11", "\x1c1", "0", "1", "3.0", "-0"]
        + ["3.5e38", "-3.4028236e38", "3.4028234e38"]  # beyond, beyond, within float32
    ),
    st.floats().map(repr),
    st.integers(-5, 30).map(str),
    st.text(max_size=6),
)


def _cell_verdict(file: str, column: int, original: str, token: str) -> Verdict:
    """Whether the file is still valid with ``token`` in place of ``original``.

    The format decides: ``transcripts.csv`` has the utterance id (column 1) and the binary
    label (column 4) the loader checks, and text it ignores; every other file is all numbers,
    where the index files' column 1 points into ``transcripts.csv`` and the modality files'
    last column is the binary label, both to be kept exactly.
    """
    if file == TRANSCRIPTS:
        if column in (0, 3):
            return Verdict.VALID if token.strip() == original.strip() else Verdict.INVALID
        return Verdict.VALID
    value = _finite_number(token)
    if value is None:
        return Verdict.INVALID
    if file in INDEX_FILES:
        keeps_its_value = column == 0  # the row number; the text features are not used
    else:
        keeps_its_value = column == COLUMNS[file] - 1  # the binary label
    if keeps_its_value and value != float(original):
        return Verdict.INVALID
    return Verdict.VALID


@st.composite
def damaged_csv_rows(draw: st.DrawFn, file: str) -> Damaged:
    """Damage to the rows and cells of one of the CSVs, with the verdict the format gives."""
    columns = COLUMNS[file]
    rows = [list(row) for row in csv.reader(io.StringIO(clean_mosi().files[file].decode()))]
    row = draw(st.integers(0, len(rows) - 1))
    kind = draw(
        st.sampled_from(
            ["cell", "drop column", "extra column", "drop row", "repeat row", "swap rows", "blank"]
        )
    )
    same_data = False
    if kind == "cell":
        column = draw(st.integers(0, columns - 1))
        token = draw(CELL_TOKENS)
        original = rows[row][column]
        verdict = _cell_verdict(file, column, original, token)
        same_data = verdict is Verdict.VALID and (
            file == TRANSCRIPTS or _finite_number(token) == float(original)
        )
        what = f"line {row + 1}, column {column + 1}: {original!r} -> {token!r}"
        rows[row][column] = token
    elif kind in ("drop column", "extra column"):
        column = draw(st.integers(0, columns - 1))
        every_row = draw(st.booleans())
        token = draw(st.text(min_size=1, max_size=4))
        for damaged_row in rows if every_row else [rows[row]]:
            if kind == "drop column":
                del damaged_row[column]
            else:
                damaged_row.insert(column, token)
        verdict = Verdict.INVALID
        lines = "every line" if every_row else f"line {row + 1}"
        what = f"{kind} {column + 1} ({token!r}) on {lines}"
    elif kind == "drop row":
        del rows[row]
        verdict, what = Verdict.INVALID, f"line {row + 1} removed"
    elif kind == "repeat row":
        rows.insert(draw(st.integers(0, len(rows))), list(rows[row]))
        verdict, what = Verdict.INVALID, f"line {row + 1} repeated"
    elif kind == "swap rows":
        other = draw(st.integers(0, len(rows) - 2))
        other += other >= row  # any line but ``row``
        rows[row], rows[other] = rows[other], rows[row]
        # Lines of utterances with the same binary label swap silently; others do not.
        verdict, what = Verdict.MAYBE_VALID, f"lines {row + 1} and {other + 1} swapped"
    else:
        rows.insert(row, [])
        verdict, what, same_data = Verdict.VALID, f"blank line before line {row + 1}", True
    return Damaged(_write_rows(rows), what, verdict, same_data)


@given(data=st.data())
def test_mosi_loader_survives_byte_damage(data: st.DataObject) -> None:
    file = data.draw(st.sampled_from(LOADER_FILES), label="file")
    valid = clean_mosi().files[file]
    damaged = _with_csv_verdict(file, valid, data.draw(damaged_bytes(valid), label="damage"))
    check_damaged_source(file, damaged)


@given(data=st.data())
def test_mosi_loader_survives_damaged_csv_rows(data: st.DataObject) -> None:
    file = data.draw(st.sampled_from(CSV_FILES), label="file")
    check_damaged_source(file, data.draw(damaged_csv_rows(file), label="damage"))


# --------------------------------------------------------------------------------------------
# The .csd label file


def _csd_videos() -> dict[str, dict[str, np.ndarray]]:
    with h5py.File(io.BytesIO(clean_mosi().files[LABELS_CSD]), "r") as csd:
        return {
            video: {name: group[name][()] for name in ("features", "intervals")}
            for video, group in csd[CSD_DATA_GROUP].items()
        }


def _write_csd(videos: dict[str, dict[str, object]], data_path: str = CSD_DATA_GROUP) -> bytes:
    """A .csd with ``videos`` under ``data_path``; a video given as an array is a dataset."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as csd:
        root = csd.create_group(data_path)
        for video, entries in videos.items():
            if isinstance(entries, np.ndarray):
                root[video] = entries
                continue
            group = root.create_group(video)
            for name, value in entries.items():
                group[name] = value
    return buffer.getvalue()


CSD_KINDS = [
    "features shape",
    "intervals shape",
    "features dtype",
    "features non-finite",
    "features out of range",
    "intervals non-finite",
    "missing dataset",
    "missing video",
    "extra dataset",
    "extra video",
    "video is a dataset",
    "no data group",
    "data is a dataset",
    "empty dataspace",
    "dangling link",
]


@st.composite
def damaged_csd(draw: st.DrawFn) -> Damaged:
    """Damage to the HDF5 structure and arrays of the label file, with its verdict."""
    videos: dict[str, dict[str, object]] = {v: dict(e) for v, e in _csd_videos().items()}
    video = draw(st.sampled_from(sorted(videos)))
    entry = videos[video]
    features, intervals = np.asarray(entry["features"]), np.asarray(entry["intervals"])
    kind = draw(st.sampled_from(CSD_KINDS))
    where = f"{video}: {kind}"
    if kind in ("features shape", "intervals shape"):
        name, old = ("features", features) if kind == "features shape" else ("intervals", intervals)
        reshapes = {
            "flatten": lambda a: a.reshape(-1),
            "add axis": lambda a: a[..., None],
            "one more column": lambda a: np.concatenate([a, a[:, :1]], axis=1),
            "drop a row": lambda a: a[:-1],
            "empty": lambda a: a[:0],
            "0-d": lambda a: np.asarray(a.reshape(-1)[0]),
        }
        op = draw(st.sampled_from(sorted(reshapes)))
        entry[name] = reshapes[op](old)
        return Damaged(_write_csd(videos), f"{where} {op}", Verdict.INVALID)
    if kind == "features dtype":
        dtype = draw(
            st.sampled_from(["float64", "float16", "int8", "int64", "bool", "complex64", "S4"])
            | st.just("vlen str")
            | st.just("compound")
        )
        if dtype == "vlen str":
            entry["features"] = np.array([[str(v)] for v in features[:, 0]], dtype=object)
        elif dtype == "compound":
            compound = np.zeros(features.shape, dtype=[("value", "f4"), ("other", "i4")])
            compound["value"] = features
            entry["features"] = compound
        else:
            entry["features"] = features.astype(dtype)
        if dtype == "float64":
            verdict = Verdict.VALID  # the same values, stored wider
        elif dtype in ("float16", "int8", "int64"):
            verdict = Verdict.MAYBE_VALID  # numbers, though rounded
        else:
            verdict = Verdict.INVALID  # not sentiment scores
        return Damaged(_write_csd(videos), f"{where} {dtype}", verdict, dtype == "float64")
    if kind in ("features non-finite", "features out of range", "intervals non-finite"):
        name = "intervals" if kind == "intervals non-finite" else "features"
        array = np.asarray(entry[name], dtype=np.float64).copy()
        position = draw(st.integers(0, array.size - 1))
        if kind == "features out of range":
            value = draw(st.floats(3.0, 1e30, exclude_min=True)) * draw(st.sampled_from([1, -1]))
        else:
            value = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        array.reshape(-1)[position] = value
        entry[name] = array
        # The intervals are not used (the join is by stored order), so they may hold anything.
        verdict = Verdict.VALID if name == "intervals" else Verdict.INVALID
        what = f"{where} [{position}] = {value}"
        return Damaged(_write_csd(videos), what, verdict, name == "intervals")
    if kind == "missing dataset":
        del entry[draw(st.sampled_from(["features", "intervals"]))]
        return Damaged(_write_csd(videos), where, Verdict.INVALID)
    if kind == "missing video":
        del videos[video]
        return Damaged(_write_csd(videos), where, Verdict.INVALID)
    if kind == "extra dataset":
        entry["notes"] = np.arange(3)
        return Damaged(_write_csd(videos), where, Verdict.VALID, same_data=True)
    if kind == "extra video":
        videos["unused_video"] = dict(entry)
        return Damaged(_write_csd(videos), where, Verdict.VALID, same_data=True)
    if kind == "video is a dataset":
        videos[video] = features  # type: ignore[assignment]
        return Damaged(_write_csd(videos), where, Verdict.INVALID)
    if kind == "no data group":
        return Damaged(_write_csd(videos, "Other Labels/data"), where, Verdict.INVALID)
    if kind == "data is a dataset":
        buffer = io.BytesIO()
        with h5py.File(buffer, "w") as csd:
            csd[CSD_DATA_GROUP] = np.zeros(3)
        return Damaged(buffer.getvalue(), where, Verdict.INVALID)
    if kind == "empty dataspace":
        entry["features"] = h5py.Empty("f4")
        return Damaged(_write_csd(videos), where, Verdict.INVALID)
    # "dangling link"
    entry["features"] = h5py.SoftLink("/nowhere")
    return Damaged(_write_csd(videos), where, Verdict.INVALID)


@given(damaged=damaged_csd())
def test_mosi_loader_survives_a_damaged_label_file(damaged: Damaged) -> None:
    check_damaged_source(LABELS_CSD, damaged)


# --------------------------------------------------------------------------------------------
# The cache


def _cache_arrays() -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(clean_mosi().cache), allow_pickle=False) as stored:
        return {name: stored[name] for name in stored.files}


@st.composite
def damaged_cache_arrays(draw: st.DrawFn) -> Damaged:
    """A cache with the right key whose arrays are missing, extra, reshaped, retyped or NaN."""
    arrays = _cache_arrays()
    name = draw(st.sampled_from(sorted(arrays)))
    old = arrays[name]
    kind = draw(st.sampled_from(["missing", "extra", "shape", "dtype", "non-finite", "0-d"]))
    if kind == "missing":
        del arrays[name]
    elif kind == "extra":
        arrays["extra"] = np.zeros(2)
    elif kind == "shape":
        ops = {
            "flatten": lambda a: a.reshape(-1),
            "add axis": lambda a: a[..., None],
            "drop a row": lambda a: a[:-1] if a.ndim else a,
            "repeat": lambda a: np.concatenate([a, a]) if a.ndim else a[None],
        }
        op = draw(st.sampled_from(sorted(ops)))
        arrays[name] = ops[op](old)
        kind = f"{kind} {op}"
    elif kind == "dtype":
        dtype = draw(st.sampled_from(["float64", "float16", "int64", "int32", "bool", "U3"]))
        try:
            arrays[name] = old.astype(dtype)
        except ValueError:  # text that is not a number
            arrays[name] = np.zeros(old.shape, dtype=dtype)
        kind = f"{kind} {dtype}"
    elif kind == "non-finite":
        floats = sorted(n for n, a in arrays.items() if a.dtype.kind == "f" and a.size)
        name = draw(st.sampled_from(floats))
        array = arrays[name].copy()
        array.reshape(-1)[draw(st.integers(0, array.size - 1))] = draw(
            st.sampled_from([math.nan, math.inf, -math.inf])
        )
        arrays[name] = array
    else:
        arrays[name] = np.asarray(old.reshape(-1)[0] if old.size else 0)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return Damaged(buffer.getvalue(), f"{name}: {kind}", Verdict.VALID, same_data=True)


@given(data=st.data())
def test_damaged_cache_is_rebuilt_and_changes_nothing(data: st.DataObject) -> None:
    clean = clean_mosi()
    damaged = data.draw(
        st.one_of(damaged_bytes(clean.cache), damaged_cache_arrays()), label="cache damage"
    )
    with mosi_copy({}, cache=damaged.content) as root:
        # A cache is disposable: whatever is wrong with it, the load rebuilds it.
        assert_same_data(_load(root), clean.dataset)
        # ... and the rebuilt one is used next time.
        lines: list[str] = []
        assert_same_data(_load(root, log=lines.append), clean.dataset)
        assert any("loaded from cache" in line for line in lines), lines
        assert os.listdir(root / "cache") == [clean.cache_name]
