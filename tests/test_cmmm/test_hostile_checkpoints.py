"""Hostile checkpoints: damaged, edited or lying files are refused naming what is wrong.

The checkpoints are made by the tests (a plausible ``RunCheckpoint`` written by
``write_checkpoint``), then damaged: bytes zeroed anywhere, fields removed, retyped or made to
disagree with each other. Reading one must give back exactly what was written or a one-line
``CheckpointError`` naming the file (and the field, when a field is at fault).
"""

from __future__ import annotations

import copy
import hashlib
import io
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cmmm.checkpoints import (
    CHECKPOINT_FILE,
    LEGACY_FORMAT,
    RunCheckpoint,
    capture_rng,
    read_checkpoint,
    write_checkpoint,
)
from cmmm.errors import CheckpointError

NUM_STEPS = 3


def sample_checkpoint(completed: int = 2) -> RunCheckpoint:
    row = [{"acc": 50.0, "f1": 0.5}] * NUM_STEPS
    return RunCheckpoint(
        config={"stream": "synthetic", "strategy": "naive", "seed": 0},
        run_key="0123456789",
        completed_steps=completed,
        num_steps=NUM_STEPS,
        template={"model": {"weight": torch.arange(64, dtype=torch.float32)}},
        evaluator={"history": {step: copy.deepcopy(row) for step in range(completed)}},
        pretraining={"epochs": 1},
        train_seconds=1.5,
        wall_seconds=2.5,
        tensorboard={"events.out.tfevents.1": 120},
        rng=capture_rng(),
    )


def same_content(a: RunCheckpoint, b: RunCheckpoint) -> bool:
    buffers = []
    for checkpoint in (a, b):
        buffer = io.BytesIO()
        torch.save(asdict(checkpoint), buffer)
        buffers.append(buffer.getvalue())
    return buffers[0] == buffers[1]


def assert_one_line_naming(error: CheckpointError, path: Path, field: str | None = None) -> None:
    message = str(error)
    assert "\n" not in message, message
    assert str(path) in message, message
    if field is not None:
        assert repr(field) in message, message


@pytest.fixture
def written(tmp_path: Path) -> tuple[Path, RunCheckpoint]:
    path = tmp_path / CHECKPOINT_FILE
    checkpoint = sample_checkpoint()
    write_checkpoint(path, checkpoint)
    return path, checkpoint


def test_round_trip_is_exact(written: tuple[Path, RunCheckpoint]) -> None:
    path, checkpoint = written
    assert same_content(read_checkpoint(path), checkpoint)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_zeroed_bytes_never_load_silently(data: st.DataObject, tmp_path_factory) -> None:
    # The attack: 64 zeroed bytes inside checkpoint.pt loaded and changed the result.
    path = tmp_path_factory.mktemp("zeroed") / CHECKPOINT_FILE
    checkpoint = sample_checkpoint()
    write_checkpoint(path, checkpoint)
    content = bytearray(path.read_bytes())
    start = data.draw(st.integers(0, len(content) - 1), label="offset")
    length = data.draw(st.integers(1, 64), label="length")
    content[start : start + length] = bytes(len(content[start : start + length]))
    path.write_bytes(bytes(content))
    started = time.monotonic()
    try:
        loaded = read_checkpoint(path)
    except CheckpointError as error:
        assert_one_line_naming(error, path)
    else:
        # Only zeroes over what was already zero (or unused zip padding) may load, unchanged.
        assert same_content(loaded, checkpoint), "a damaged checkpoint loaded different content"
    assert time.monotonic() - started < 10


def rewrite_payload(path: Path, edit: Any) -> None:
    """Edit the checkpoint's fields and store them with a matching checksum, as an attacker
    (or a user with a script) could: only the field checks can catch this."""
    envelope = torch.load(path, weights_only=True)
    content = torch.load(io.BytesIO(envelope["payload"]), weights_only=True)
    edit(content)
    buffer = io.BytesIO()
    torch.save(content, buffer)
    envelope["payload"] = buffer.getvalue()
    envelope["sha256"] = hashlib.sha256(envelope["payload"]).hexdigest()
    torch.save(envelope, path)


FIELDS = [
    "config",
    "run_key",
    "completed_steps",
    "num_steps",
    "template",
    "evaluator",
    "pretraining",
    "train_seconds",
    "wall_seconds",
    "tensorboard",
    "rng",
]


@pytest.mark.parametrize("field", FIELDS)
def test_missing_field_is_named(written: tuple[Path, RunCheckpoint], field: str) -> None:
    path, _ = written
    rewrite_payload(path, lambda content: content.pop(field))
    with pytest.raises(CheckpointError, match="missing field") as info:
        read_checkpoint(path)
    assert_one_line_naming(info.value, path, field)


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("wrong", ["text", 1.5, None, [1, 2]], ids=["str", "float", "none", "list"])
def test_field_of_the_wrong_type_is_named(
    written: tuple[Path, RunCheckpoint], field: str, wrong: object
) -> None:
    path, checkpoint = written
    if isinstance(getattr(checkpoint, field), type(wrong)) or (
        field.endswith("seconds") and isinstance(wrong, float)
    ):
        pytest.skip("the same type as the field")

    def retype(content: dict[str, Any]) -> None:
        content[field] = wrong

    rewrite_payload(path, retype)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert_one_line_naming(info.value, path, field)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda c: c.update(completed_steps=NUM_STEPS), "completed_steps"),  # claims finished
        (lambda c: c.update(completed_steps=NUM_STEPS + 5), "completed_steps"),
        (lambda c: c.update(completed_steps=-1), "completed_steps"),
        (lambda c: c.update(num_steps=0), "num_steps"),
        (lambda c: c.update(train_seconds=float("nan")), "train_seconds"),
        (lambda c: c["evaluator"]["history"].pop(0), "completed_steps"),
        (lambda c: c.update(tensorboard={"events": -3}), "tensorboard"),
        (lambda c: c["rng"].pop("torch"), "rng"),
    ],
    ids=["claims-finished", "beyond", "negative", "no-steps", "nan-time", "lost-row", "tb", "rng"],
)
def test_inconsistent_fields_are_named(
    written: tuple[Path, RunCheckpoint], edit: Any, field: str
) -> None:
    path, _ = written
    rewrite_payload(path, edit)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert_one_line_naming(info.value, path, field)


def test_checksum_mismatch_is_refused(written: tuple[Path, RunCheckpoint]) -> None:
    path, _ = written
    envelope = torch.load(path, weights_only=True)
    payload = bytearray(envelope["payload"])
    payload[len(payload) // 2] ^= 0xFF
    envelope["payload"] = bytes(payload)
    torch.save(envelope, path)
    with pytest.raises(CheckpointError, match="checksum mismatch") as info:
        read_checkpoint(path)
    assert_one_line_naming(info.value, path)


def test_format_1_checkpoint_loads_with_a_warning(tmp_path: Path) -> None:
    # What cmmm wrote before checksums: the fields next to "format": 1, in one torch.save.
    path = tmp_path / CHECKPOINT_FILE
    checkpoint = sample_checkpoint()
    torch.save({"format": LEGACY_FORMAT, **asdict(checkpoint)}, path)
    warnings: list[str] = []
    loaded = read_checkpoint(path, warnings.append)
    assert same_content(loaded, checkpoint)
    assert len(warnings) == 1 and "no checksum" in warnings[0] and str(path) in warnings[0]
    # Its fields are still checked.
    torch.save({"format": LEGACY_FORMAT, **asdict(replace(checkpoint, completed_steps=3))}, path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert_one_line_naming(info.value, path, "completed_steps")


def test_unknown_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / CHECKPOINT_FILE
    torch.save({"format": 99}, path)
    with pytest.raises(CheckpointError, match="checkpoint format 99") as info:
        read_checkpoint(path)
    assert_one_line_naming(info.value, path)
