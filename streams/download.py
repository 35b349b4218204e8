"""Fetch a dataset's published files into ``<data_dir>/<name>``, verified, all or nothing.

Every file is fetched into a staging directory beside the target and checked against its
published sha256 and size. Only when all of them are verified are they moved into place, so a
failed, truncated or tampered download leaves the target exactly as it was.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

from cmmm.atomic_files import current_umask
from cmmm.errors import ConfigError, DownloadError
from streams.mfeat import MFEAT_DIRNAME, download_mfeat
from streams.mosi import MOSI_DIRNAME, MOSI_FILES, MosiFile, file_sha256

Log = Callable[[str], None]

DOWNLOADABLE: dict[str, Sequence[MosiFile]] = {MOSI_DIRNAME: MOSI_FILES}
# Datasets with no public file to fetch: the user supplies the published pickles.
USER_SUPPLIED: dict[str, str] = {
    "iemocap": "MulT's iemocap_data.pkl (linked from the MulT repository README)",
    "sims": "MMSA's CH-SIMS unaligned_39.pkl (from the MMSA dataset release)",
}
# Datasets published as one archive whose parsed values are verified, not its bytes: each has
# its own fetch-verify-install function (data_dir, source, log) -> target directory.
ARCHIVE_DOWNLOADS: dict[str, Callable[[Path, str | None, Log], Path]] = {
    MFEAT_DIRNAME: download_mfeat
}
_URL_SCHEMES = ("http", "https", "file")
_CHUNK = 1 << 20
_TIMEOUT_SECONDS = 60
# The whole download of one file must finish within this, however the source trickles (the
# per-read timeout alone lets a source sending a byte every 20 s hold us forever): generous for
# the slowest honest link, at 20 kB/s.
_DEADLINE_BASE_SECONDS = 300
_DEADLINE_BYTES_PER_SECOND = 20_000


def download_dataset(
    name: str, data_dir: Path, source: str | None = None, log: Log = print
) -> Path:
    """Download dataset ``name`` into ``<data_dir>/<name>`` and return that directory.

    ``source`` replaces the public addresses: a base URL (``http://``, ``https://``,
    ``file://``) or a local directory, under which the files live at the same relative paths
    as in ``<data_dir>/<name>``. Files already present with the right checksum are kept.
    """
    key = name.strip().lower()
    if key in ARCHIVE_DOWNLOADS:
        return ARCHIVE_DOWNLOADS[key](Path(data_dir), source, log)
    if key in USER_SUPPLIED:
        raise ConfigError(
            f"{name} has no public download: it comes from {USER_SUPPLIED[key]}, a pickle you "
            f"supply yourself; place it in {Path(data_dir) / key}/. "
            f"Downloadable datasets: {', '.join(sorted([*DOWNLOADABLE, *ARCHIVE_DOWNLOADS]))}"
        )
    if key not in DOWNLOADABLE:
        known = sorted([*DOWNLOADABLE, *ARCHIVE_DOWNLOADS]) + [
            f"{n} (user-supplied pickle)" for n in USER_SUPPLIED
        ]
        raise ConfigError(f"unknown dataset {name!r}; known datasets: {', '.join(known)}")
    files = DOWNLOADABLE[key]
    data_dir = Path(data_dir)
    target = data_dir / key
    if target.exists() and not target.is_dir():
        raise DownloadError(f"{target} exists and is not a directory; move it away and retry")

    needed = [f for f in files if not _already_verified(target / f.path, f)]
    for f in files:
        if f not in needed:
            log(f"{key}: {f.path} already present and verified")
    if not needed:
        log(f"{key}: all {len(files)} files present in {target}")
        return target

    data_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(data_dir, key, files)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.download-", dir=data_dir))
    try:
        for f in needed:
            location = _location(f, source)
            log(f"{key}: fetching {f.path} from {location}")
            _fetch_verified(location, staging / f.path, f)
        _install(staging, target, needed)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"{key}: {len(needed)} files fetched and verified into {target}")
    return target


def deadline_seconds(size: int) -> float:
    """How long fetching a file of ``size`` bytes may take in all."""
    return _DEADLINE_BASE_SECONDS + size / _DEADLINE_BYTES_PER_SECOND


def _remove_stale_staging(data_dir: Path, key: str, files: Sequence[MosiFile]) -> None:
    """Delete staging directories a killed download left (Ctrl-C and errors clean their own).

    Only those older than the longest a whole download may take: a younger one may belong to a
    download still running in another process.
    """
    oldest_live = time.time() - sum(deadline_seconds(f.size) for f in files)
    for stray in data_dir.glob(f".{key}.download-*"):
        try:
            if stray.is_dir() and stray.stat().st_mtime < oldest_live:
                shutil.rmtree(stray, ignore_errors=True)
        except OSError:
            pass


def _already_verified(path: Path, expected: MosiFile) -> bool:
    return (
        path.is_file()
        and path.stat().st_size == expected.size
        and file_sha256(path) == expected.sha256
    )


def _location(entry: MosiFile, source: str | None) -> str:
    """Where to read ``entry`` from: its public URL, a URL under ``source``, or a local path."""
    if source is None:
        return entry.url
    if urllib.parse.urlparse(source).scheme in _URL_SCHEMES:
        return source.rstrip("/") + "/" + urllib.parse.quote(entry.path)
    base = Path(source).expanduser()
    if not base.is_dir():
        raise DownloadError(
            f"source {source} is neither a URL (http://, https://, file://) nor an existing "
            "directory; give a directory laid out like <data_dir>/mosi or a base URL"
        )
    return str(base / entry.path)


def _open(location: str) -> BinaryIO:
    if urllib.parse.urlparse(location).scheme in _URL_SCHEMES:
        return urllib.request.urlopen(location, timeout=_TIMEOUT_SECONDS)
    return open(location, "rb")


def _fetch_verified(location: str, dest: Path, expected: MosiFile) -> None:
    """Copy ``location`` to ``dest``, raising DownloadError unless size and sha256 match."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    received = 0
    allowed = deadline_seconds(expected.size)
    deadline = time.monotonic() + allowed
    try:
        with _open(location) as response, open(dest, "wb") as out:
            # Read at most one byte past the expected size: enough to tell "too long" without
            # letting a hostile or wrong source fill the disk.
            while received <= expected.size:
                if time.monotonic() > deadline:
                    raise DownloadError(
                        f"{expected.path}: {location} sent {received} of {expected.size} bytes "
                        f"in {allowed:.0f} s, the most a download of this file may take; "
                        "nothing was installed; try again later or use another --source"
                    )
                chunk = response.read(min(_CHUNK, expected.size + 1 - received))
                if not chunk:
                    break
                digest.update(chunk)
                out.write(chunk)
                received += len(chunk)
    except urllib.error.HTTPError as err:
        raise DownloadError(
            f"{expected.path}: HTTP {err.code} {err.reason} from {location} "
            f"(expected sha256 {expected.sha256}); check the address or try again later"
        ) from err
    except (OSError, http.client.HTTPException, urllib.error.URLError) as err:
        raise DownloadError(
            f"{expected.path}: could not read {location} ({err}) "
            f"(expected sha256 {expected.sha256}); check the source and try again"
        ) from err
    actual = digest.hexdigest()
    if received != expected.size:
        got = f"{received} bytes" if received < expected.size else "more bytes than that"
        raise DownloadError(
            f"{expected.path}: download from {location} has the wrong size: expected "
            f"{expected.size} bytes, got {got}; expected sha256 {expected.sha256}, actual sha256 "
            f"{actual} (of what was read). Nothing was installed; try again or use another source"
        )
    if actual != expected.sha256:
        raise DownloadError(
            f"{expected.path}: checksum mismatch for {location}: expected sha256 "
            f"{expected.sha256}, actual sha256 {actual}. Nothing was installed; the source "
            "holds a different or corrupted file"
        )


def _install(staging: Path, target: Path, fetched: Sequence[MosiFile]) -> None:
    """Move verified files from ``staging`` into ``target``."""
    if not target.exists():
        # One rename publishes the whole dataset at once. mkdtemp made the directory private.
        os.chmod(staging, 0o777 & ~current_umask())
        os.replace(staging, target)
        return
    # The target already holds verified files (and perhaps the loader's cache): replace only
    # what was fetched, each file atomically.
    for f in fetched:
        dest = target / f.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / f.path, dest)
