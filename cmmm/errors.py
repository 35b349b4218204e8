"""The project's own error types.

The CLI turns every ``CmmmError`` into a one-line message and a non-zero exit code, so each
message must say what was wrong and what to do about it.
"""

from __future__ import annotations


class CmmmError(Exception):
    """Base class of every error cmmm raises on purpose."""


class DataError(CmmmError):
    """A data file or directory is missing, malformed, hostile or inconsistent."""


class DatasetNotFoundError(DataError):
    """The data directory does not hold the files a stream needs."""


class DownloadError(DataError):
    """A download failed, was truncated, or did not match its checksum."""


class ConfigError(CmmmError):
    """A configuration value (stream, strategy, task order, option) is invalid."""


class CheckpointError(CmmmError):
    """A run's checkpoint is missing, unreadable, or belongs to another configuration."""


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (line breaks included) made one space.

    For foreign text put into a message (another library's exception, a name read from a file),
    so that the message stays the one line the CLI promises.
    """
    return " ".join(str(text).split())
