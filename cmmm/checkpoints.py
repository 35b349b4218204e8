"""A run's checkpoint: ``<run dir>/checkpoint.pt``, replaced after every training step.

It holds everything a run needs to continue exactly as if it had not stopped: the resolved
configuration and its key, how many steps are done, the template's state (model, optimizer,
plugins: ``cmmm.template_state``), the evaluator's history, the pre-training record, the time
spent so far, the size of every TensorBoard events file, and the random number generators.

The file holds that content as the bytes ``torch.save`` makes of it together with their sha256,
checked on every read; every field is then checked for its type and for agreement with the
others (the steps done and the rows of the stored accuracy matrix), so a damaged or edited
checkpoint is a ``CheckpointError`` naming the field, never a silently different result.

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

import hashlib
import io
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmmm.atomic_files import atomic_write
from cmmm.errors import CheckpointError, one_line
from cmmm.run_config import LOCATION_FIELDS

CHECKPOINT_FILE = "checkpoint.pt"
# Bumped whenever the layout below changes; an unknown format is refused with a clear message.
# Format 2 wraps the format-1 content (torch.save bytes) with its sha256; a format-1 file (no
# checksum, written before it) still loads with a warning.
CHECKPOINT_FORMAT = 2
LEGACY_FORMAT = 1


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
    """Replace ``path`` atomically with ``checkpoint`` and the sha256 of its payload."""
    content = asdict(checkpoint)
    buffer = io.BytesIO()
    torch.save(content, buffer)
    payload = buffer.getvalue()
    envelope = {
        "format": CHECKPOINT_FORMAT,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "payload": payload,
    }
    atomic_write(path, lambda handle: torch.save(envelope, handle))


def read_checkpoint(path: Path, log: Callable[[str], object] | None = None) -> RunCheckpoint:
    """The checkpoint at ``path``, verified; a missing, damaged, edited or foreign file is a
    ``CheckpointError`` naming the field at fault.

    A checkpoint of format 1 (written before checkpoints carried a checksum) still loads, after
    the same field checks, with a warning through ``log``: its content cannot be verified.
    """
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no checkpoint there; start the run with `cmmm run` (without --resume)"
        )
    content = _load_torch(path, path.read_bytes())
    if not isinstance(content, dict) or "format" not in content:
        raise CheckpointError(f"{path}: not a cmmm checkpoint (no format field)")
    if content["format"] == LEGACY_FORMAT:
        if log is not None:
            log(
                f"warning: {path} has no checksum (written by an older cmmm): its content cannot "
                "be verified, only checked field by field"
            )
        content = {k: v for k, v in content.items() if k != "format"}
    elif content["format"] == CHECKPOINT_FORMAT:
        content = _verified_payload(path, content)
    else:
        raise CheckpointError(
            f"{path}: checkpoint format {content['format']!r}, this version of cmmm reads formats "
            f"{LEGACY_FORMAT} and {CHECKPOINT_FORMAT}; finish the run with the version that "
            "started it, or start over"
        )
    return _checked_fields(path, content)


def _load_torch(path: Path, data: bytes) -> Any:
    try:
        # weights_only: tensors and plain containers only, never code. Everything is loaded on
        # the CPU: the RNG states must be, and the rest is moved where it belongs when restored.
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - every way a file can be unreadable ends here
        raise CheckpointError(
            f"{path}: not a readable cmmm checkpoint ({type(error).__name__}: "
            f"{one_line(str(error).splitlines()[0])[:160] if str(error) else 'no detail'}); "
            "delete the run directory to start the run over"
        ) from None


def _verified_payload(path: Path, envelope: dict[str, Any]) -> Any:
    payload, digest = envelope.get("payload"), envelope.get("sha256")
    if not isinstance(payload, bytes) or not isinstance(digest, str):
        raise CheckpointError(
            f"{path}: not a readable cmmm checkpoint (field 'payload' or 'sha256' missing or of "
            "the wrong type); delete the run directory to start the run over"
        )
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(
            f"{path}: checksum mismatch (sha256 of the payload is not the one stored with it): "
            "the file was damaged or edited; delete the run directory to start the run over"
        )
    return _load_torch(path, payload)


# The type every field must have; numbers are checked for range in _checked_fields.
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "config": dict,
    "run_key": str,
    "completed_steps": int,
    "num_steps": int,
    "template": dict,
    "evaluator": dict,
    "pretraining": dict,
    "train_seconds": (int, float),
    "wall_seconds": (int, float),
    "tensorboard": dict,
    "rng": dict,
}


def _checked_fields(path: Path, content: Any) -> RunCheckpoint:
    if not isinstance(content, dict):
        raise CheckpointError(f"{path}: not a cmmm checkpoint (its payload is not a dict)")
    expected = [f.name for f in fields(RunCheckpoint)]
    missing = [name for name in expected if name not in content]
    if missing:
        raise CheckpointError(
            f"{path}: not a complete cmmm checkpoint (missing field {missing[0]!r}"
            f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}); delete the run "
            "directory to start the run over"
        )
    for name in expected:
        kind = _FIELD_TYPES[name]
        value = content[name]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise _field_error(path, name, f"is a {type(value).__name__}")
    num_steps, completed = content["num_steps"], content["completed_steps"]
    if num_steps < 1:
        raise _field_error(path, "num_steps", f"is {num_steps}, not a step count")
    if not 0 <= completed <= num_steps:
        raise _field_error(path, "completed_steps", f"is {completed}, outside 0..{num_steps}")
    for name in ("train_seconds", "wall_seconds"):
        if not math.isfinite(content[name]) or content[name] < 0:
            raise _field_error(path, name, f"is {content[name]}")
    _check_history(path, content["evaluator"], completed, "evaluator")
    for part in ("held_out", "valid"):
        if part in content["evaluator"]:
            _check_history(path, content["evaluator"][part], completed, f"evaluator.{part}")
    sizes = content["tensorboard"]
    if not all(isinstance(k, str) and type(v) is int and v >= 0 for k, v in sizes.items()):
        raise _field_error(path, "tensorboard", "does not map file names to sizes")
    missing_rng = sorted({"python", "numpy", "torch", "cuda"} - set(content["rng"]))
    if missing_rng:
        raise _field_error(path, "rng", f"lacks {missing_rng}")
    return RunCheckpoint(**{name: content[name] for name in expected})


def _check_history(path: Path, state: Any, completed: int, name: str) -> None:
    """The evaluator recorded exactly one row of the matrix per completed step."""
    history = state.get("history") if isinstance(state, dict) else None
    if not isinstance(history, dict):
        raise _field_error(path, f"{name}.history", "is missing or not a dict")
    if not all(type(step) is int for step in history):
        raise _field_error(path, f"{name}.history", "has steps that are not whole numbers")
    if sorted(history) != list(range(completed)):
        rows = sorted(history)
        raise _field_error(
            path,
            "completed_steps",
            f"says {completed} steps are done but the stored accuracy matrix ({name}) has rows "
            f"for steps {rows[:10]}",
        )


def _field_error(path: Path, name: str, problem: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: field {name!r} {problem}; the checkpoint was damaged or edited, delete the run "
        "directory to start the run over"
    )


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
