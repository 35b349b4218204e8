"""Writing a file so that a crash at any moment leaves either the old file or the new one.

The content goes to a temporary file in the same directory, is flushed and fsync'ed, and then
replaces the target with ``os.replace`` (atomic on POSIX and Windows when both are on one file
system); the directory is fsync'ed too, so that the rename itself survives a power cut. A crash
before the rename leaves the previous file untouched (and at worst a stray ``.<name>.*.tmp``,
which ``remove_stale_temporaries`` clears).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Create or replace ``path`` with what ``write`` writes to the binary handle it is given."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path), suffix=".tmp")
    except OSError as error:
        _name_path(error, path.parent)
        raise
    try:
        # mkstemp makes the file 0600; a result or checkpoint gets the usual 0644 (umask).
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        # A write to a full disk names no file; the message should name the one being written.
        _name_path(error, path)
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_directory(path.parent)


def _name_path(error: OSError, path: Path) -> None:
    # Only a system error (errno and strerror set) prints its filename; setting one on another
    # OSError would replace its message.
    if error.filename is None and error.strerror is not None:
        error.filename = str(path)


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    # Elsewhere: set and restore (not atomic across threads, which cmmm does not write from).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """``atomic_write`` of UTF-8 text."""
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files a killed writer of ``path`` may have left beside it."""
    for stray in path.parent.glob(f"{_temporary_prefix(path)}*.tmp"):
        stray.unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename durable. Not every platform can open a directory (Windows cannot); the
    # replace is still atomic there, only its durability across a power cut is not guaranteed.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
