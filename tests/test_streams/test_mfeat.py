"""The ``mfeat`` stream: both layouts, the fixed split, views, damaged files, the download."""

from __future__ import annotations

import http.server
import io
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from conftest import resolve_shared_data_dir
from fuzzing import assert_reports_file_and_problem
from mfeat_fixtures import (
    csv_bytes,
    shared_cells,
    synthetic_cells,
    uci_bytes,
    write_csv_layout,
    write_uci_layout,
)
from typer.testing import CliRunner

import streams.mfeat as mfeat
from cmmm.cli import app
from cmmm.errors import ConfigError, DataError, DatasetNotFoundError, DownloadError
from streams.download import download_dataset
from streams.mfeat import (
    NUM_ROWS,
    VIEW_DIMS,
    VIEW_SHA256,
    csv_name,
    load_mfeat,
    read_view,
    stratified_split,
    uci_name,
    view_digest,
)

ALL_VIEWS = tuple(VIEW_DIMS)
SHARED = shared_cells(resolve_shared_data_dir())
needs_shared = pytest.mark.skipif(SHARED is None, reason="shared mfeat CSVs absent")


def _quiet(_: str) -> None:
    pass


def test_both_layouts_give_identical_arrays(tmp_path: Path) -> None:
    # The real cells when the shared data is there (so the pinned checksums are checked on both
    # layouts), else synthetic ones.
    cells = SHARED if SHARED is not None else synthetic_cells()
    write_csv_layout(tmp_path / "csv" / "mfeat", cells)
    write_uci_layout(tmp_path / "uci" / "mfeat", cells)
    from_csv = load_mfeat(tmp_path / "csv", views=ALL_VIEWS, log=_quiet)
    from_uci = load_mfeat(tmp_path / "uci", views=ALL_VIEWS, log=_quiet)
    for name, split in from_csv.splits.items():
        other = from_uci.splits[name]
        np.testing.assert_array_equal(split.labels, other.labels)
        for view in ALL_VIEWS:
            assert split.features[view].dtype == np.float32
            np.testing.assert_array_equal(split.features[view], other.features[view])
    for view in ALL_VIEWS:
        a = read_view(tmp_path / "csv" / "mfeat" / csv_name(view), view)
        b = read_view(tmp_path / "uci" / "mfeat" / uci_name(view), view)
        assert view_digest(view, a) == view_digest(view, b)
    assert from_csv.notes["verified"] == from_uci.notes["verified"] == (SHARED is not None)


@needs_shared
def test_pinned_checksums_are_those_of_the_shared_files() -> None:
    root = resolve_shared_data_dir() / "mfeat"
    for view in ALL_VIEWS:
        values = read_view(root / csv_name(view), view)
        assert values.shape == (NUM_ROWS, VIEW_DIMS[view])
        assert view_digest(view, values) == VIEW_SHA256[view], view


def test_digest_is_canonical() -> None:
    values = np.array([[0.0, 1.5]])
    assert view_digest("mor", values) == view_digest("mor", np.array([[-0.0, 1.5]]))
    assert view_digest("mor", values) == view_digest("mor", values.astype(">f8"))
    assert view_digest("mor", values) != view_digest("zer", values)
    assert view_digest("mor", values) != view_digest("mor", np.array([[0.0, 1.5000001]]))


def test_fixed_stratified_split_counts(tmp_path: Path) -> None:
    split = stratified_split()
    assert {name: len(rows) for name, rows in split.items()} == {
        "train": 1200,
        "valid": 200,
        "test": 600,
    }
    every = np.concatenate(list(split.values()))
    assert sorted(every.tolist()) == list(range(NUM_ROWS))  # disjoint and complete
    for name, rows in split.items():
        np.testing.assert_array_equal(rows, stratified_split()[name])  # the same every time
    write_csv_layout(tmp_path / "mfeat", synthetic_cells(("zer", "mor")))
    dataset = load_mfeat(tmp_path, views="zer,mor", log=_quiet)
    per_class = {"train": 120, "valid": 20, "test": 60}
    for name, part in dataset.splits.items():
        assert np.bincount(part.labels, minlength=10).tolist() == [per_class[name]] * 10
        assert part.features["zer"].shape == (len(part), 1, 47)
    assert dataset.task_type == "classification" and dataset.num_classes == 10
    assert dataset.metric_family == "classification"


def test_views_option_order_and_task_count(tmp_path: Path, tiny_config) -> None:
    from cmmm.running import load_stream

    write_csv_layout(tmp_path / "data" / "mfeat", synthetic_cells())
    dataset = load_mfeat(tmp_path / "data", views="mor,fou", log=_quiet)
    assert dataset.modalities == ("mor", "fou")
    stream = load_stream(tiny_config(stream="mfeat", stream_options={}).resolved(), log=_quiet)
    assert stream.dataset.modalities == ("fou", "zer", "mor") and len(stream.tasks) == 7
    six = tiny_config(stream="mfeat", stream_options={"views": ",".join(ALL_VIEWS)})
    tasks = load_stream(six.resolved(), log=_quiet).tasks
    assert len(tasks) == 63 and len({t.code for t in tasks}) == len({t.name for t in tasks}) == 63
    assert tasks[0].code == "fckpzm"
    for bad in ("", "fou,fou", "fou,abc", 3):
        with pytest.raises(ConfigError, match="views"):
            load_mfeat(tmp_path / "data", views=bad, log=_quiet)  # type: ignore[arg-type]


def test_tiny_run_on_mfeat(tmp_path: Path, tiny_config) -> None:
    from cmmm.running import run

    write_csv_layout(tmp_path / "data" / "mfeat", synthetic_cells(("zer", "mor")))
    results = run(tiny_config(stream="mfeat", stream_options={"views": "zer,mor"}), log=_quiet)
    assert results["metric_family"] == "classification"
    assert [t["code"] for t in results["stream"]["tasks"]] == ["zm", "m", "z"]
    assert {"acc", "f1", "f1_macro"} <= set(results["per_task_final"][0])
    assert results["stream"]["tasks"][0]["test_samples"] == 600


# --------------------------------------------------------------------------------------------
# Damaged files: one-line DataError naming the file


def _replace_line(content: bytes, index: int, new: bytes | None) -> bytes:
    lines = content.split(b"\n")
    if new is None:
        del lines[index]
    else:
        lines[index] = new
    return b"\n".join(lines)


def _with_cell(content: bytes, line: int, cell: str, csv: bool) -> bytes:
    lines = content.split(b"\n")
    fields = lines[line].split(b",") if csv else lines[line].split()
    fields[3] = cell.encode()
    lines[line] = (b"," if csv else b"  ").join(fields)
    return b"\n".join(lines)


CSV_DAMAGE = {
    "missing column": lambda c: _replace_line(c, 5, b",".join(c.split(b"\n")[5].split(b",")[1:])),
    "NaN": lambda c: _with_cell(c, 7, "nan", True),
    "infinite": lambda c: _with_cell(c, 7, "-inf", True),
    "beyond float32": lambda c: _with_cell(c, 7, "3.5e38", True),
    "non-numeric": lambda c: _with_cell(c, 9, "abc", True),
    "truncated": lambda c: c[: len(c) // 2],
    "row missing": lambda c: _replace_line(c, 30, None),
    "row added": lambda c: c + c.split(b"\n")[1] + b"\n",
    "wrong label": lambda c: _replace_line(c, 3, c.split(b"\n")[3][:-1] + b"7"),
    "header": lambda c: _replace_line(c, 0, b"0,1,2"),
    "empty": lambda c: b"",
    "binary": lambda c: b"\xff\xfe\x00garbage",
}
UCI_DAMAGE = {
    "missing column": lambda c: _replace_line(c, 5, b" ".join(c.split(b"\n")[5].split()[1:])),
    "NaN": lambda c: _with_cell(c, 7, "NaN", False),
    "non-numeric": lambda c: _with_cell(c, 9, "1,5", False),
    "truncated": lambda c: c[: len(c) // 2],
    "row missing": lambda c: _replace_line(c, 30, None),
    "label column": lambda c: _replace_line(c, 2, c.split(b"\n")[2] + b"  0"),
}


@pytest.mark.parametrize("layout", ["csv", "uci"])
def test_damaged_files_give_one_line_data_errors(tmp_path: Path, layout: str) -> None:
    cells = synthetic_cells(("mor",))
    valid = csv_bytes("mor", cells["mor"]) if layout == "csv" else uci_bytes(cells["mor"])
    name = csv_name("mor") if layout == "csv" else uci_name("mor")
    damages = CSV_DAMAGE if layout == "csv" else UCI_DAMAGE
    for what, damage in damages.items():
        root = tmp_path / what / "mfeat"
        root.mkdir(parents=True)
        (root / name).write_bytes(damage(valid))
        with pytest.raises(DataError) as caught:
            load_mfeat(root.parent, views="mor", log=_quiet)
        assert_reports_file_and_problem(str(caught.value), name)
        assert "cmmm data download mfeat" in str(caught.value), what


def test_missing_directory_and_missing_view(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="cmmm data download mfeat"):
        load_mfeat(tmp_path, log=_quiet)
    write_csv_layout(tmp_path / "mfeat", synthetic_cells(("fou", "zer")))
    with pytest.raises(DatasetNotFoundError) as caught:
        load_mfeat(tmp_path, log=_quiet)
    assert_reports_file_and_problem(str(caught.value), "mfeat-mor")


def test_differing_values_load_with_a_warning(tmp_path: Path) -> None:
    write_uci_layout(tmp_path / "mfeat", synthetic_cells(("mor",)))
    said: list[str] = []
    dataset = load_mfeat(tmp_path, views="mor", log=said.append)
    assert dataset.notes["verified"] is False
    assert any(
        "other values than the published data" in line and "mfeat-mor" in line for line in said
    )


# --------------------------------------------------------------------------------------------
# cmmm data download mfeat


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def serve(directory: Path) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(_QuietHandler, directory=str(directory))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _uci_zip(cells: dict[str, list[list[str]]]) -> bytes:
    """A zip like UCI's: the six whitespace files (in a folder, plus a stray info file)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for view, rows in cells.items():
            archive.writestr(f"mfeat/{uci_name(view)}", uci_bytes(rows))
        archive.writestr("mfeat/mfeat.info", "Multiple Features Database\n")
    return buffer.getvalue()


@needs_shared
def test_download_over_http_installs_verified_views(tmp_path: Path) -> None:
    assert SHARED is not None
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "mf.zip").write_bytes(_uci_zip(SHARED))
    target_root = tmp_path / "data"
    with serve(tmp_path / "site") as url:
        target = download_dataset("mfeat", target_root, source=f"{url}/mf.zip", log=_quiet)
    assert sorted(p.name for p in target.iterdir()) == sorted(uci_name(v) for v in ALL_VIEWS)
    dataset = load_mfeat(target_root, views=ALL_VIEWS, log=_quiet)
    assert dataset.notes["verified"] is True
    said: list[str] = []
    download_dataset("mfeat", target_root, source=str(tmp_path / "nowhere"), log=said.append)
    assert any("present and verified" in line for line in said)  # nothing fetched again


@needs_shared
def test_download_from_local_directory_in_either_layout(tmp_path: Path) -> None:
    assert SHARED is not None
    shared = resolve_shared_data_dir() / "mfeat"
    uci = write_uci_layout(tmp_path / "uci", SHARED)
    for source, target_root in ((shared, tmp_path / "a"), (uci, tmp_path / "b")):
        result = CliRunner().invoke(
            app,
            ["data", "download", "mfeat", "--from", str(source), "--data-dir", str(target_root)],
        )
        assert result.exit_code == 0, result.output
        assert load_mfeat(target_root, views=ALL_VIEWS, log=_quiet).notes["verified"]
    (tmp_path / "z.zip").write_bytes(_uci_zip(SHARED))
    download_dataset("mfeat", tmp_path / "c", source=str(tmp_path / "z.zip"), log=_quiet)
    assert load_mfeat(tmp_path / "c", views=ALL_VIEWS, log=_quiet).notes["verified"]


def test_download_of_other_values_installs_nothing(tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "mf.zip").write_bytes(_uci_zip(synthetic_cells()))
    target_root = tmp_path / "data"
    with serve(tmp_path / "site") as url, pytest.raises(DownloadError) as caught:
        download_dataset("mfeat", target_root, source=f"{url}/mf.zip", log=_quiet)
    message = str(caught.value)
    assert "other values than the published data" in message and "Nothing was installed" in message
    assert "\n" not in message
    assert not (target_root / "mfeat").exists()
    assert [p.name for p in target_root.iterdir()] == []  # no staging left behind


def test_download_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DownloadError, match="not a readable zip"):
        download_dataset("mfeat", tmp_path / "d", source=str(tmp_path / "bad.zip"), log=_quiet)
    partial_dir = write_csv_layout(tmp_path / "partial", synthetic_cells(("fou", "zer")))
    with pytest.raises(DownloadError, match="no file of view fac"):
        download_dataset("mfeat", tmp_path / "d", source=str(partial_dir), log=_quiet)
    damaged = write_uci_layout(tmp_path / "damaged", synthetic_cells())
    (damaged / uci_name("kar")).write_bytes(b"1 2 3\n")
    with pytest.raises(DownloadError) as caught:
        download_dataset("mfeat", tmp_path / "d", source=str(damaged), log=_quiet)
    assert "mfeat-kar" in str(caught.value) and "nothing was installed" in str(caught.value)
    with serve(tmp_path) as url, pytest.raises(DownloadError, match="HTTP 404"):
        download_dataset("mfeat", tmp_path / "d", source=f"{url}/absent.zip", log=_quiet)
    assert not (tmp_path / "d" / "mfeat").exists()


def test_download_without_source_fetches_uci_archive(tmp_path: Path, monkeypatch) -> None:
    asked: list[str] = []

    def fake_urlopen(url: str, timeout: float):
        asked.append(url)
        return io.BytesIO(_uci_zip(synthetic_cells()))

    monkeypatch.setattr(mfeat.urllib.request, "urlopen", fake_urlopen)
    with pytest.raises(DownloadError, match="other values"):
        download_dataset("mfeat", tmp_path, log=_quiet)
    assert asked == [mfeat.UCI_URL]


@needs_shared
def test_download_refuses_to_leave_the_other_layout_beside(tmp_path: Path) -> None:
    assert SHARED is not None
    target = tmp_path / "data" / "mfeat"
    write_csv_layout(target, synthetic_cells(("fou",)))  # a stale CSV the loader would read
    uci = write_uci_layout(tmp_path / "uci", SHARED)
    with pytest.raises(DownloadError, match="other layout"):
        download_dataset("mfeat", tmp_path / "data", source=str(uci), log=_quiet)
    assert sorted(p.name for p in target.iterdir()) == [csv_name("fou")]


def test_sources_md_address_is_the_one_fetched() -> None:
    sources = resolve_shared_data_dir() / "mfeat" / "SOURCES.md"
    if not sources.is_file():
        pytest.skip("shared mfeat SOURCES.md absent")
    assert mfeat.UCI_URL in sources.read_text()
