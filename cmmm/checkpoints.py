"""A run's checkpoint: ``<run dir>/checkpoint.pt``, replaced after every training step.

It holds everything a run needs to continue exactly as if it had not stopped: the resolved
configuration and its key, how many steps are done, the template's state (model, optimizer,
plugins: ``cmmm.template_state``), the evaluator's history, the pre-training record, the time
spent so far, the size of every TensorBoard events file, and the random number generators.

Only the last checkpoint is kept, and it is replaced atomically (``cmmm.atomic_files``): a crash
at any moment, even while the file is being written, leaves the previous checkpoint intact. It is
read with ``torch.load(weights_only=True)``, so loading never runs code from the file; everything
in it is a tensor or a plain container.

TensorBoard: events written after a checkpoint would be written again by the resumed run. So the
checkpoint records each events file's size (after a flush, at a record boundary), and resuming
cuts the files back to those sizes and deletes newer ones (``rewind_event_files``): a resumed run's
TensorBoard directory holds the same events as an uninterrupted run's, not duplicates.
``SummaryWriter(purge_step=...)`` cannot do this: it hides events from one step on for every tag,
and the run's tags count steps on different axes (training step, epoch of a step, global epoch).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmmm.atomic_files import atomic_write
from cmmm.errors import CheckpointError

CHECKPOINT_FILE = "checkpoint.pt"
# Bumped whenever the layout below changes; an older file is refused with a clear message.
CHECKPOINT_FORMAT = 1
# RunConfig fields that say where and how a run is computed, not what it computes
# (RunConfig.key() ignores them too): they may change between sessions.
LOCATION_FIELDS = ("out", "data_dir", "cache_dir", "device", "threads", "eval_batch_size")


@dataclass
class RunCheckpoint:
    """One checkpoint's content (see the module docstring)."""

    config: dict[str, Any]
    run_key: str
    completed_steps: int
    num_steps: int
    template: dict[str, Any]
    evaluator: dict[str, Any]
    pretraining: dict[str, Any]
    train_seconds: float
    wall_seconds: float
    tensorboard: dict[str, int]
    rng: dict[str, Any]

    @property
    def finished(self) -> bool:
        return self.completed_steps >= self.num_steps

    def check_config(self, config: dict[str, Any], key: str, path: Path) -> None:
        """Refuse to continue with a configuration other than the one the run started with."""
        if key == self.run_key:
            return
        changed = sorted(
            name
            for name in set(config) | set(self.config)
            if name not in LOCATION_FIELDS and config.get(name) != self.config.get(name)
        )
        raise CheckpointError(
            f"{path} belongs to another configuration (run key {self.run_key}, this one's is "
            f"{key}; different: {', '.join(changed) or 'defaults of this version of cmmm'}); "
            "resume it with its own configuration (`cmmm run --resume RUN_DIR`), or delete the "
            "run directory to start over"
        )


def write_checkpoint(path: Path, checkpoint: RunCheckpoint) -> None:
    """Replace ``path`` atomically with ``checkpoint``."""
    content = {"format": CHECKPOINT_FORMAT, **asdict(checkpoint)}
    atomic_write(path, lambda handle: torch.save(content, handle))


def read_checkpoint(path: Path) -> RunCheckpoint:
    """The checkpoint at ``path``; a missing, damaged or foreign file is a ``CheckpointError``."""
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no checkpoint there; start the run with `cmmm run` (without --resume)"
        )
    try:
        # weights_only: tensors and plain containers only, never code. Everything is loaded on
        # the CPU: the RNG states must be, and the rest is moved where it belongs when restored.
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - every way a file can be unreadable ends here
        raise CheckpointError(
            f"{path}: not a readable cmmm checkpoint ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no detail'}); "
            "delete the run directory to start the run over"
        ) from None
    if not isinstance(content, dict) or "format" not in content:
        raise CheckpointError(f"{path}: not a cmmm checkpoint (no format field)")
    if content["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: checkpoint format {content['format']}, this version of cmmm reads format "
            f"{CHECKPOINT_FORMAT}; finish the run with the version that started it, or start over"
        )
    expected = {f.name for f in fields(RunCheckpoint)}
    missing = sorted(expected - set(content))
    if missing:
        raise CheckpointError(f"{path}: not a complete cmmm checkpoint (missing {missing})")
    return RunCheckpoint(**{name: content[name] for name in expected})


# --------------------------------------------------------------------------------------------
# Random number generators
# --------------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """Python's, NumPy's and torch's global generators (CUDA's too when present)."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        # NumPy's key is an array, which weights_only loading refuses: kept as a tensor.
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy_state["bit_generator"],
            "state": {
                "key": numpy_state["key"].numpy().astype(np.uint32),
                "pos": numpy_state["pos"],
            },
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    # A run continued on another machine (or without its GPU) keeps what it can.
    if (
        state["cuda"]
        and torch.cuda.is_available()
        and torch.cuda.device_count() == len(state["cuda"])
    ):
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# TensorBoard events
# --------------------------------------------------------------------------------------------

_EVENTS_GLOB = "events.out.tfevents.*"


def event_file_sizes(directory: Path) -> dict[str, int]:
    """Each events file's size; call after the writers' ``flush()``."""
    return {path.name: path.stat().st_size for path in sorted(directory.glob(_EVENTS_GLOB))}


def rewind_event_files(directory: Path, sizes: dict[str, int]) -> None:
    """Bring ``directory``'s events files back to ``event_file_sizes``'s record: cut the recorded
    ones to their size (dropping the events written after it) and delete the newer ones."""
    for path in directory.glob(_EVENTS_GLOB):
        if path.name not in sizes:
            path.unlink()
        elif path.stat().st_size > sizes[path.name]:
            with open(path, "r+b") as handle:
                handle.truncate(sizes[path.name])
