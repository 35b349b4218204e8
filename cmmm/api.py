"""The Python API: run a configuration from a notebook or a script and get its results back.

    import cmmm
    results = cmmm.run(stream="synthetic", strategy="ours", seed=0, strategy_options={"lam": 1.0})
    results.aa, results.fm, results.matrix_array()
    again = cmmm.load_results(results.directory)    # what `cmmm run` wrote, as the same object

``run`` is what ``cmmm run`` calls: the same defaults, the same run directory and
``results.json``; the object it returns is that file read back (``cmmm.results.Results``, one
attribute per key of the file; ``to_json()`` gives the file's content).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cmmm.results import Results, load_results


def run(
    config: Any = None,
    /,
    *,
    log: Callable[[str], None] | None = print,
    resume: bool = False,
    **settings: Any,
) -> Results:
    """Run one configuration and return its results.

    ``config`` is a ``RunConfig``, a mapping of its fields, or a path to a TOML config file (or
    a finished run's ``results.json``, to repeat it); ``settings`` (``RunConfig`` fields) override
    it. ``log=None`` silences the progress messages. ``resume=True`` continues an interrupted run
    of this configuration from its last checkpoint (``cmmm run --resume``).
    """
    from cmmm.config import resolve
    from cmmm.running import run as run_config

    resolved = resolve(config, where="cmmm.run", **settings)
    written = run_config(resolved, log=log or (lambda _message: None), resume=resume)
    return load_results(Path(written["run_dir"]))


__all__ = ["Results", "load_results", "run"]
