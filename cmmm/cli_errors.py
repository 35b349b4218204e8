"""What the command line says when a command fails in a way cmmm did not raise on purpose.

``CmmmError`` messages are written for the user already. Everything else still ends in one
line and an exit code, never a traceback: an ``OSError`` names its path, a ``MemoryError`` says
what to make smaller, Ctrl-C exits with 130 (checkpoints are written atomically, so the last one
is kept), and any other exception names its type and the file its traceback was saved to, so it
can be reported.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from pathlib import Path

from cmmm.errors import one_line

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
_DETAIL_CHARS = 300


def describe_failure(error: BaseException) -> tuple[int, str] | None:
    """(exit code, one-line message) for ``error``; None for what must propagate (exits)."""
    if isinstance(error, SystemExit | GeneratorExit) or _is_click_exit(error):
        return None
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED, (
            "interrupted; every checkpoint written so far is kept: continue a run with "
            "`cmmm run --resume RUN_DIR`"
        )
    if isinstance(error, MemoryError):
        return EXIT_ERROR, (
            "out of memory; lower --batch-size or --eval-batch-size, use a smaller model "
            "(backbone options) or free memory, then run again"
        )
    if isinstance(error, OSError):
        return EXIT_ERROR, os_error_message(error)
    saved = save_traceback(error)
    where = f"the traceback is in {saved}" if saved else "the traceback could not be saved"
    return EXIT_ERROR, (
        f"unexpected {type(error).__name__}: {_short(error)}; {where}; please report it"
    )


def os_error_message(error: OSError) -> str:
    """``OSError`` as one line naming the path(s) it concerns."""
    reason = error.strerror or str(error) or type(error).__name__
    paths = [str(p) for p in (error.filename, error.filename2) if p is not None]
    where = f": {' -> '.join(paths)}" if paths else ""
    hint = ""
    if error.errno is not None and error.errno in _HINTS:
        hint = f"; {_HINTS[error.errno]}"
    return one_line(f"{reason}{where}{hint}")


_HINTS = {
    28: "free disk space (the last complete checkpoint is kept), then resume",  # ENOSPC
    13: "check the permissions, or choose another directory",  # EACCES
    30: "the file system is read-only: choose another directory",  # EROFS
    20: "a path component is a file, not a directory",  # ENOTDIR
    17: "it already exists",  # EEXIST
    21: "it is a directory, a file was expected",  # EISDIR
}


def save_traceback(error: BaseException) -> Path | None:
    """Write ``error``'s traceback to a new file in the temporary directory; its path, or None."""
    text = "".join(traceback.format_exception(error))
    try:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        descriptor, name = tempfile.mkstemp(prefix=f"cmmm-crash-{stamp}-", suffix=".txt")
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        return Path(name)
    except OSError:
        return None


def _short(error: BaseException) -> str:
    text = one_line(error) or "no detail"
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."


def _is_click_exit(error: BaseException) -> bool:
    # typer.Exit, typer.Abort and click's usage errors carry their own exit code and message.
    module = type(error).__module__
    return module.startswith("click") or module.startswith("typer")
