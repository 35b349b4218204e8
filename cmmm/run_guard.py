"""Guards around a training run: one writer per run directory, and no silent divergence.

``locked_run_directory``: a run holds an exclusive ``fcntl`` lock on ``<run dir>/.cmmm-lock``
while it writes there, so a second process writing the same run (same configuration, or a
``--resume`` of it) is refused at once instead of interleaving TensorBoard events, checkpoints
and results.

``DivergenceGuard``: a plugin that stops the run with a ``DivergenceError`` naming the step,
epoch and batch of the first non-finite training loss. It never asks the device for the loss
inside a training iteration (no host sync per step): each iteration queues a finite-check on the
device, and the flags are read together every ``check_every`` iterations and at the end of every
epoch, so the run stops within that many batches of the first bad one, before its epoch ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from avalanche.core import SupervisedPlugin

from cmmm.errors import CmmmError, ConfigError

LOCK_FILE = ".cmmm-lock"


class RunDirectoryBusyError(CmmmError):
    """Another process is writing the run directory."""


class DivergenceError(CmmmError):
    """The training loss became NaN or infinite."""


@contextlib.contextmanager
def locked_run_directory(run_dir: Path) -> Iterator[Path]:
    """Create ``run_dir`` if needed and hold its write lock for the ``with`` block."""
    # The directories this call creates (the run's, and --out's if new): removed again if the
    # run writes nothing, so that a refused configuration leaves no trace.
    created = [d for d in (run_dir, *run_dir.parents) if not d.exists()]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # --out names a file, or a directory we may not write
        raise ConfigError(
            f"cannot create the run directory {run_dir} ({error.strerror or error}); --out must "
            "name a directory you can write"
        ) from None
    lock_path = run_dir / LOCK_FILE
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirectoryBusyError(
                f"{run_dir} is being written by another cmmm process (it holds {lock_path}); "
                "wait for it to finish, or use another --out or --seed"
            ) from None
        yield run_dir
    finally:
        os.close(descriptor)  # releases the lock
        if created:
            _remove_if_unused(run_dir, created)


def _remove_if_unused(run_dir: Path, created: list[Path]) -> None:
    # A run that failed before writing anything (say, its data is missing) leaves no empty
    # directory behind. The lock file stays in any directory that holds something else.
    try:
        if [p.name for p in run_dir.iterdir()] != [LOCK_FILE]:
            return
        (run_dir / LOCK_FILE).unlink()
        for directory in created:  # innermost first; stops at one something else now holds
            directory.rmdir()
    except OSError:
        pass


class DivergenceGuard(SupervisedPlugin):
    """Raises ``DivergenceError`` at the first non-finite training loss (see the module doc)."""

    def __init__(self, num_steps: int, hint: str, check_every: int = 50) -> None:
        super().__init__()
        self.num_steps = num_steps
        self.hint = hint
        self.check_every = check_every
        self.step = 0
        self.epoch = 0
        # One 0-d bool tensor per batch of the current epoch not yet read: True = not finite.
        self._flags: list[torch.Tensor] = []
        self._checked_batches = 0

    def start_step(self, step: int) -> None:
        self.step, self.epoch = step, 0

    def before_training_epoch(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self._flags, self._checked_batches = [], 0

    def after_training_iteration(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        # Queued on the loss's device: no transfer to the host here.
        self._flags.append(~torch.isfinite(strategy.loss.detach()).all())
        if len(self._flags) >= self.check_every:
            self._check()

    def after_training_epoch(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self._check()
        self.epoch += 1

    def _check(self) -> None:
        if not self._flags:
            return
        bad = torch.nonzero(torch.stack(self._flags)).flatten().tolist()  # the one host sync
        if bad:
            batch = self._checked_batches + bad[0]
            raise DivergenceError(
                f"training diverged: the loss is NaN or infinite at step {self.step + 1} of "
                f"{self.num_steps}, epoch {self.epoch + 1}, batch {batch + 1}; {self.hint}"
            )
        self._checked_batches += len(self._flags)
        self._flags = []

    # Nothing carries over between steps: a checkpoint is only written after a whole step.
    def checkpoint_state(self, context: Any) -> dict[str, Any]:
        return {}

    def restore_checkpoint_state(self, state: dict[str, Any], context: Any) -> None:
        pass
