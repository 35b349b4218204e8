"""Downloading CMU-MOSI: verified, all-or-nothing, from HTTP, file:// or a local directory."""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pytest

import streams.download as download
from cmmm.errors import ConfigError, DownloadError
from streams.download import download_dataset
from streams.mosi import LOADER_FILES, MOSI_FILES, load_mosi

REPO = Path(__file__).resolve().parents[2]


def _data_dir() -> Path:
    configured = Path(os.environ.get("CMMM_DATA_DIR", REPO.parent / "shared" / "data"))
    # CI gives a path relative to the repository.
    return configured if configured.is_absolute() else (REPO / configured).resolve()


SHARED_MOSI = _data_dir() / "mosi"
needs_real_data = pytest.mark.skipif(
    not _data_dir().is_dir(), reason=f"data directory {_data_dir()} absent (set CMMM_DATA_DIR)"
)
CORRUPTED = "bc-LSTM/data/audio/audio_test0.csv"
TRUNCATED = "bc-LSTM/data/text_test.csv"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def serve(directory: Path) -> Iterator[str]:
    """Serve ``directory`` over HTTP on 127.0.0.1; yield the base URL."""
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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): _sha256(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _assert_all_verified(target: Path) -> None:
    for entry in MOSI_FILES:
        path = target / entry.path
        assert path.stat().st_size == entry.size, entry.path
        assert _sha256(path) == entry.sha256, entry.path


def _copy_source(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    shutil.copytree(SHARED_MOSI, source)
    for path in source.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return source


def _damage(source: Path, corrupt: str | None = None, truncate: str | None = None) -> None:
    if corrupt:
        content = bytearray((source / corrupt).read_bytes())
        content[1000] ^= 0x01
        (source / corrupt).write_bytes(bytes(content))
    if truncate:
        content = (source / truncate).read_bytes()
        (source / truncate).write_bytes(content[: len(content) - 5000])


def _quiet(_: str) -> None:
    pass


@needs_real_data
def test_download_over_http_verifies_every_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    lines: list[str] = []
    with serve(SHARED_MOSI) as url:
        target = download_dataset("mosi", data_dir, source=url, log=lines.append)
    assert target == data_dir / "mosi"
    _assert_all_verified(target)
    # Nothing but the dataset is left in the data directory (no staging directory).
    assert [p.name for p in data_dir.iterdir()] == ["mosi"]
    assert sum("fetching" in line for line in lines) == len(MOSI_FILES)
    # What was downloaded is what the loader reads (its cache goes beside the data).
    dataset = load_mosi(data_dir, log=_quiet)
    assert (len(dataset.train) + len(dataset.valid), len(dataset.test)) == (1447, 752)
    assert list((target / ".cmmm-cache").glob("*.npz"))

    # Everything is present: a second call fetches nothing, so it works with no server at all.
    again: list[str] = []
    download_dataset("mosi", data_dir, source=url, log=again.append)
    assert not any("fetching" in line for line in again)
    _assert_all_verified(target)


@needs_real_data
@pytest.mark.parametrize(
    ("corrupt", "truncate", "expected"),
    [
        (CORRUPTED, None, "checksum mismatch"),
        (None, TRUNCATED, "wrong size"),
        (CORRUPTED, TRUNCATED, ""),
    ],
)
def test_damaged_http_source_installs_nothing(
    tmp_path: Path, corrupt: str | None, truncate: str | None, expected: str
) -> None:
    source = _copy_source(tmp_path)
    _damage(source, corrupt=corrupt, truncate=truncate)
    data_dir = tmp_path / "data"
    with serve(source) as url, pytest.raises(DownloadError) as caught:
        download_dataset("mosi", data_dir, source=url, log=_quiet)
    message = str(caught.value)
    assert expected in message
    damaged = next(p for p in MOSI_FILES if p.path in message)
    assert damaged.path in (corrupt, truncate)
    assert f"expected sha256 {damaged.sha256}" in message
    assert f"actual sha256 {_sha256(source / damaged.path)}" in message
    assert not (data_dir / "mosi").exists()
    assert list(data_dir.iterdir()) == []


@needs_real_data
def test_truncated_download_reports_the_actual_checksum(tmp_path: Path) -> None:
    source = _copy_source(tmp_path)
    _damage(source, truncate=TRUNCATED)
    with serve(source) as url, pytest.raises(DownloadError) as caught:
        download_dataset("mosi", tmp_path / "data", source=url, log=_quiet)
    assert TRUNCATED in str(caught.value)
    assert f"actual sha256 {_sha256(source / TRUNCATED)}" in str(caught.value)


@needs_real_data
def test_failed_download_leaves_an_existing_target_unchanged(tmp_path: Path) -> None:
    source = _copy_source(tmp_path)
    data_dir = tmp_path / "data"
    download_dataset("mosi", data_dir, source=str(source), log=_quiet)
    target = data_dir / "mosi"
    # An older, incomplete copy with a file of the user's: both missing files must be fetched,
    # one of them is corrupted at the source.
    (target / CORRUPTED).unlink()
    (target / TRUNCATED).write_bytes(b"stale")
    (target / ".cmmm-cache").mkdir()
    (target / ".cmmm-cache" / "keep.npz").write_bytes(b"user data")
    before = _snapshot(target)
    _damage(source, corrupt=CORRUPTED)
    with serve(source) as url, pytest.raises(DownloadError, match="checksum mismatch"):
        download_dataset("mosi", data_dir, source=url, log=_quiet)
    assert _snapshot(target) == before
    assert sorted(p.name for p in data_dir.iterdir()) == ["mosi"]


@needs_real_data
def test_missing_file_at_the_source_is_a_download_error(tmp_path: Path) -> None:
    source = _copy_source(tmp_path)
    (source / CORRUPTED).unlink()
    with serve(source) as url, pytest.raises(DownloadError, match=r"HTTP 404") as caught:
        download_dataset("mosi", tmp_path / "data", source=url, log=_quiet)
    assert CORRUPTED in str(caught.value)
    assert not (tmp_path / "data" / "mosi").exists()


@needs_real_data
def test_local_directory_and_file_url_sources(tmp_path: Path) -> None:
    from_dir = download_dataset("mosi", tmp_path / "a", source=str(SHARED_MOSI), log=_quiet)
    _assert_all_verified(from_dir)
    from_url = download_dataset("mosi", tmp_path / "b", source=SHARED_MOSI.as_uri(), log=_quiet)
    _assert_all_verified(from_url)


@needs_real_data
def test_only_missing_or_wrong_files_are_fetched(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    target = download_dataset("mosi", data_dir, source=str(SHARED_MOSI), log=_quiet)
    (target / CORRUPTED).write_bytes(b"wrong")
    (target / TRUNCATED).unlink()
    # The source holds only those two files: fetching any other one would fail.
    source = tmp_path / "partial"
    for relative in (CORRUPTED, TRUNCATED):
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SHARED_MOSI / relative, source / relative)
    lines: list[str] = []
    download_dataset("mosi", data_dir, source=str(source), log=lines.append)
    assert sum("fetching" in line for line in lines) == 2
    _assert_all_verified(target)


@needs_real_data
def test_without_source_the_public_addresses_are_used(tmp_path: Path, monkeypatch) -> None:
    by_url = {entry.url: SHARED_MOSI / entry.path for entry in MOSI_FILES}
    requested: list[str] = []

    def fake_open(location: str):
        requested.append(location)
        return open(by_url[location], "rb")

    monkeypatch.setattr(download, "_open", fake_open)
    target = download_dataset("mosi", tmp_path / "data", log=_quiet)
    assert sorted(requested) == sorted(by_url)
    assert all(url.startswith("https://raw.githubusercontent.com/") for url in requested)
    _assert_all_verified(target)


def test_published_file_list_covers_what_the_loader_reads() -> None:
    paths = [entry.path for entry in MOSI_FILES]
    assert len(set(paths)) == len(paths)
    assert set(LOADER_FILES) <= set(paths)
    for entry in MOSI_FILES:
        assert len(entry.sha256) == 64 and entry.size > 0
        assert entry.url.endswith(entry.path.rsplit("/", 1)[-1])


def test_unknown_dataset_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown dataset 'mosei'.*mosi"):
        download_dataset("mosei", tmp_path, log=_quiet)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("name", "origin"), [("iemocap", "MulT"), ("sims", "MMSA")])
def test_user_supplied_datasets_explain_where_they_come_from(
    tmp_path: Path, name: str, origin: str
) -> None:
    with pytest.raises(ConfigError, match=rf"{name} has no public download.*{origin}.*pickle"):
        download_dataset(name, tmp_path, log=_quiet)


def test_source_that_is_neither_url_nor_directory(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="neither a URL"):
        download_dataset("mosi", tmp_path / "data", source=str(tmp_path / "absent"), log=_quiet)
    assert not (tmp_path / "data" / "mosi").exists()


def test_public_addresses_are_the_repository_paths_of_sources_md() -> None:
    # SOURCES.md: declare-lab/multimodal-deep-learning @ 111b401... : bc-LSTM/data/<file>, and
    # the LICENSE at that repository's root; the labels from worldreboot/... : cmumosi/<file>.
    base = (
        "https://raw.githubusercontent.com/declare-lab/multimodal-deep-learning/"
        "111b401d867c14a1dcd930fd2b2ab58a5eca3f70/"
    )
    by_path = {entry.path: entry.url for entry in MOSI_FILES}
    assert by_path["bc-LSTM/data/transcripts.csv"] == base + "bc-LSTM/data/transcripts.csv"
    assert by_path["bc-LSTM/data/audio/audio_test0.csv"] == (
        base + "bc-LSTM/data/audio/audio_test0.csv"
    )
    assert by_path["bc-LSTM/LICENSE"] == base + "LICENSE"
    assert by_path["labels/CMU_MOSI_Opinion_Labels.csd"] == (
        "https://raw.githubusercontent.com/worldreboot/audio-text-sentiment-analysis/"
        "40df4d8e7ed1b120e2a36286d96b3b6968e00b13/cmumosi/CMU_MOSI_Opinion_Labels.csd"
    )
