"""Hostile feature pickles: each class of attack, generated here, ends in a one-line DataError.

Every payload is made by the test (nothing stored) and loaded in a child process with CPU-time
and address-space limits, so that a crash, a hang or a memory bomb fails the test instead of
taking the test run with it. The child loads every payload of a test in turn and reports, per
file: the error's type and message, the seconds it took and how much its peak memory grew.
Each must be a ``DataError`` on one line naming the file, within ``MAX_SECONDS`` and
``MAX_MEMORY_GROWTH``, and no payload may leave its marker file (code execution).
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fuzzing import assert_reports_file_and_problem
from hypothesis import given, settings
from hypothesis import strategies as st
from pickle_fixtures import mult_content, write_pickle

from cmmm.errors import DataError
from streams.pickle_cache import cached_pickle_dataset, convert_in_child
from streams.safe_pickle import PickleLimits, safe_load

REPO = Path(__file__).resolve().parents[2]
MAX_SECONDS = 10.0
MAX_MEMORY_GROWTH = 200 * 2**20  # bytes of peak resident memory one load may add
CHILD_CPU_SECONDS = 120
CHILD_ADDRESS_SPACE = 6 * 2**30  # torch, imported by cmmm, maps much; far below a bomb's ask

# Loads each file named in argv[1] (JSON) and prints one JSON line of outcomes.
CHILD = r"""
import json, resource, sys, time
from cmmm.errors import CmmmError
from streams.safe_pickle import safe_load
outcomes = []
for path in json.loads(sys.argv[1]):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    try:
        safe_load(path)
        kind, message = "loaded", ""
    except CmmmError as error:
        kind, message = type(error).__name__, str(error)
    except BaseException as error:
        kind, message = "escaped " + type(error).__name__, repr(error)[:300]
    outcomes.append({
        "path": path, "kind": kind, "message": message,
        "seconds": time.monotonic() - start,
        "memory": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024,
    })
print(json.dumps(outcomes))
"""


def _limit_child() -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (CHILD_CPU_SECONDS, CHILD_CPU_SECONDS))
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_ADDRESS_SPACE, CHILD_ADDRESS_SPACE))


def load_all_in_child(paths: list[Path]) -> list[dict[str, object]]:
    finished = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps([str(p) for p in paths])],
        capture_output=True,
        text=True,
        timeout=CHILD_CPU_SECONDS + 60,
        preexec_fn=_limit_child,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])},
        check=False,
    )
    # A crash (negative code: a signal) or a limit fails here, naming what happened.
    assert finished.returncode == 0, (
        f"the loading process died with code {finished.returncode}: {finished.stderr[-2000:]}"
    )
    return json.loads(finished.stdout.strip().splitlines()[-1])


def assert_refused_in_bounds(payloads: dict[str, bytes], tmp_path: Path) -> list[str]:
    """Write each payload, load all in a limited child, check each outcome; the messages."""
    marker = tmp_path / "pwned"
    paths = []
    for name, content in payloads.items():
        path = tmp_path / f"{name}.pkl"
        path.write_bytes(content.replace(b"MARKER", str(marker).encode()))
        paths.append(path)
    outcomes = load_all_in_child(paths)
    assert not marker.exists(), "a payload ran code"
    messages = []
    for outcome in outcomes:
        name = Path(str(outcome["path"])).name
        assert outcome["kind"] == "DataError", f"{name}: {outcome['kind']} {outcome['message']}"
        assert_reports_file_and_problem(str(outcome["message"]), name)
        assert float(outcome["seconds"]) < MAX_SECONDS, f"{name} took {outcome['seconds']} s"
        assert int(outcome["memory"]) < MAX_MEMORY_GROWTH, f"{name} grew {outcome['memory']} B"
        messages.append(str(outcome["message"]))
    return messages


# --------------------------------------------------------------------------------------------
# Opcode helpers (protocol 2 and 4 opcodes, assembled by hand)


def unicode(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def global_(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def binbytes(data: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(data)) + data


def int4(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)


def dtype_call(code: str) -> bytes:
    """numpy.dtype(code, False, True), as numpy pickles it (without BUILD)."""
    return global_("numpy", "dtype") + unicode(code) + b"\x89\x88\x87R"


P2 = b"\x80\x02"


# --------------------------------------------------------------------------------------------
# Code execution


def code_execution_payloads() -> dict[str, bytes]:
    touch = "touch MARKER"
    return {
        "os-system": P2 + global_("os", "system") + unicode(touch) + b"\x85R.",
        "posix-system": P2 + global_("posix", "system") + unicode(touch) + b"\x85R.",
        "exec": P2
        + global_("builtins", "exec")
        + unicode("open('MARKER', 'w').close()")
        + b"\x85R.",
        "eval-py2": P2 + global_("__builtin__", "eval") + unicode("1") + b"\x85R.",
        "inst": b"(" + unicode(touch) + b"ios\nsystem\n.",  # INST: class and call in one
        "obj": b"(" + global_("os", "system") + unicode(touch) + b"o.",
        "newobj": P2 + global_("subprocess", "Popen") + b"]" + unicode("touch") + b"a\x85\x81.",
        "ext": P2 + b"\x82\x01\x85R.",  # EXT1: the copyreg extension registry
        "persid": P2 + b"P0\n.",
        # The admitted ones, called in a way numpy never does, to reach further.
        "dtype-getattr": P2 + global_("builtins", "getattr") + b"N" + unicode("x") + b"\x86R.",
        "reconstruct-other-class": P2
        + global_("numpy.core.multiarray", "_reconstruct")
        + global_("os", "system")
        + b"K\x00\x85C\x01b\x87R.",
    }


def test_code_execution_is_refused(tmp_path: Path) -> None:
    messages = assert_refused_in_bounds(code_execution_payloads(), tmp_path)
    assert any("refusing to load 'os.system'" in m for m in messages)


# --------------------------------------------------------------------------------------------
# Memory corruption through numpy's constructors


def array_state(shape: tuple[int, ...], dtype: bytes, data: bytes, fortran: bool = False) -> bytes:
    """_reconstruct(ndarray, (0,), b'b') + BUILD (1, shape, dtype, fortran, data)."""
    dims = b"(" + b"".join(int4(side) for side in shape) + b"t"
    return (
        global_("numpy.core.multiarray", "_reconstruct")
        + global_("numpy", "ndarray")
        + b"K\x00\x85C\x01b\x87R"
        + b"(K\x01"
        + dims
        + dtype
        + (b"\x88" if fortran else b"\x89")
        + binbytes(data)
        + b"tb"
    )


def numpy_constructor_payloads() -> dict[str, bytes]:
    pointers = struct.pack("<QQ", 0x4141414141414141, 0xDEADBEEF)
    object_dtype = (
        dtype_call("O8") + b"(K\x03X\x01\x00\x00\x00|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK?tb"
    )
    float_as_object = (
        dtype_call("f8") + b"(K\x03X\x01\x00\x00\x00<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK?tb"
    )
    structured = dtype_call("V16") + b"."
    return {
        # ndarray(shape, dtype=object, buffer=bytes): object pointers read from the file.
        "ndarray-object-buffer": P2
        + global_("numpy", "ndarray")
        + b"K\x02\x85"
        + dtype_call("O8")
        + binbytes(pointers)
        + b"\x87R.",
        # An object array whose "items" are raw bytes (pointers), not a list.
        "reconstruct-object-bytes": P2 + array_state((2,), dtype_call("O8"), pointers) + b".",
        # A float dtype whose state's flags say "holds objects" (63).
        "dtype-forged-flags": P2 + float_as_object + b".",
        "object-dtype-state": P2 + array_state((2,), object_dtype, pointers) + b".",
        "structured-dtype": P2 + structured,
        "frombuffer-object": b"\x80\x05"
        + global_("numpy.core.numeric", "_frombuffer")
        + b"("
        + binbytes(pointers)
        + dtype_call("O8")
        + b"K\x02\x85"
        + unicode("C")
        + b"tR.",
        "scalar-object": P2
        + global_("numpy.core.multiarray", "scalar")
        + dtype_call("O8")
        + binbytes(pointers)
        + b"\x86R.",
        # Shape larger than the data: numpy would read past the buffer's end.
        "short-data": P2 + array_state((1000, 1000), dtype_call("f8"), b"\x00" * 8) + b".",
        # An object array whose list is shorter than its shape.
        "short-object-list": P2
        + global_("numpy.core.multiarray", "_reconstruct")
        + global_("numpy", "ndarray")
        + b"K\x00\x85C\x01b\x87R(K\x01(J\x00\x00\x01\x00t"
        + dtype_call("O8")
        + b"\x89]tb.",
        "datetime-dtype": P2 + dtype_call("M8") + b".",
    }


def test_numpy_constructors_never_get_file_chosen_arguments(tmp_path: Path) -> None:
    assert_refused_in_bounds(numpy_constructor_payloads(), tmp_path)


# --------------------------------------------------------------------------------------------
# Crashes and hangs from structure alone


def nested_lists(depth: int) -> bytes:
    return P2 + b"]" * depth + b"a" * (depth - 1) + b"."


def nested_marks(depth: int) -> bytes:
    return P2 + b"(" * depth + b")" + b"t" * depth + b"."


def doubling_tuples(levels: int) -> bytes:
    """t0 = (0, 0); t(k+1) = (tk, tk) via the memo: 2^levels leaves in a tiny file."""
    body = b"K\x00K\x00\x86q\x00"
    for level in range(levels):
        body += b"h" + bytes([level]) + b"h" + bytes([level]) + b"\x86q" + bytes([level + 1])
    return P2 + body + b"."


def self_referencing_list() -> bytes:
    return P2 + b"]q\x00h\x00a."  # L = []; L.append(L)


def shared_list_bomb(levels: int) -> bytes:
    """[x, x] where x is the previous list, through the memo."""
    body = b"]q\x00K\x01a"
    for level in range(levels):
        body += b"]q" + bytes([level + 1]) + b"(h" + bytes([level]) + b"h" + bytes([level]) + b"e"
    return P2 + body + b"."


def structure_payloads() -> dict[str, bytes]:
    return {
        "nested-lists-100k": nested_lists(100_000),
        "nested-marks-100k": nested_marks(100_000),
        "doubling-tuples-40": doubling_tuples(40),
        "self-referencing-list": self_referencing_list(),
        "shared-list-bomb": shared_list_bomb(40),
        # The doubling tuple as a dict key: hashing it would walk 2^40 leaves.
        "bomb-as-key": P2 + b"}" + doubling_tuples(40)[2:-1] + b"K\x01s.",
    }


def test_structure_cannot_crash_or_hang(tmp_path: Path) -> None:
    payloads = structure_payloads()
    assert all(len(p) < 30_000 or "nested" in name for name, p in payloads.items())
    messages = assert_refused_in_bounds(payloads, tmp_path)
    assert any("decompression bomb" in m for m in messages)
    assert any("nested deeper" in m or "MARK" in m for m in messages)


# --------------------------------------------------------------------------------------------
# Memory bombs: opcodes and calls that allocate what the file declares


def memory_payloads() -> dict[str, bytes]:
    huge = 1_500_000_000
    return {
        "binbytes8-1.5GB": b"\x80\x04\x8e" + struct.pack("<Q", huge) + b".",  # 12 bytes
        "binunicode8-1.5GB": b"\x80\x04\x8d" + struct.pack("<Q", huge) + b".",
        "bytearray8-1.5GB": b"\x80\x05\x96" + struct.pack("<Q", huge) + b".",
        "binbytes-4GB": P2 + b"B" + struct.pack("<I", 2**32 - 1) + b".",
        "long4-2GB": P2 + b"\x8b" + struct.pack("<i", 2**31 - 1) + b".",
        "bytes-call": P2 + global_("builtins", "bytes") + b"J\x00\x00\x00\x60\x85R.",
        "bytearray-call": P2 + global_("builtins", "bytearray") + b"J\x00\x00\x00\x60\x85R.",
        "array-shape-bomb": P2 + array_state((2**20, 2**20), dtype_call("f8"), b"") + b".",
        "wide-string-dtype": P2 + array_state((1,), dtype_call("U99999999"), b"") + b".",
        "frame-4GB": b"\x80\x04\x95" + struct.pack("<Q", 2**40) + b"N.",
        "memo-index-4G": P2 + b"Nr\xff\xff\xff\xff.",  # LONG_BINPUT at index 2^32-1: fine
        "int-digits": b"I" + b"9" * 100_000 + b"\n.",
    }


def test_declared_sizes_are_never_allocated(tmp_path: Path) -> None:
    payloads = memory_payloads()
    # LONG_BINPUT at a large index is legal and harmless: the file loads, or is refused.
    del payloads["memo-index-4G"]
    messages = assert_refused_in_bounds(payloads, tmp_path)
    assert any("declares 1500000000 bytes" in m for m in messages)


# --------------------------------------------------------------------------------------------
# Properties: generated nested and shared structures load or are refused in bounds, in process


@st.composite
def shared_structure(draw: st.DrawFn) -> tuple[bytes, int]:
    """A pickle of tuples sharing earlier ones through the memo, and its expanded size as the
    reader counts it (16 per number, 64 per tuple plus its items, shared ones every time)."""
    levels = draw(st.integers(1, 30))
    body = b"K\x00q\x00"
    sizes = [16]
    for level in range(levels):
        picks = draw(st.lists(st.integers(0, level), min_size=1, max_size=4))
        body += b"(" + b"".join(b"h" + bytes([p]) for p in picks) + b"tq" + bytes([level + 1])
        sizes.append(64 + sum(sizes[p] for p in picks))
    return P2 + body + b".", sizes[-1]


@settings(max_examples=60, deadline=None)
@given(case=shared_structure())
def test_shared_structures_load_only_when_small(case: tuple[bytes, int], tmp_path_factory) -> None:
    content, expanded = case
    path = tmp_path_factory.mktemp("shared") / "shared.pkl"
    path.write_bytes(content)
    limits = PickleLimits(expansion_slack=2**16)
    budget = limits.expansion_factor * len(content) + limits.expansion_slack
    try:
        loaded = safe_load(path, limits)
    except DataError as error:
        assert_reports_file_and_problem(str(error), path.name)
        assert expanded > budget, f"refused at {expanded} <= {budget}: {error}"
        return
    assert expanded <= budget
    hash(loaded)  # bounded: this is what a bomb would hang on


@settings(max_examples=40, deadline=None)
@given(depth=st.integers(1, 300), kind=st.sampled_from(["list", "tuple", "dict"]))
def test_nesting_loads_to_the_limit_then_is_refused(
    depth: int, kind: str, tmp_path_factory
) -> None:
    value: object = 0
    for _ in range(depth):
        value = [value] if kind == "list" else (value,) if kind == "tuple" else {"k": value}
    path = tmp_path_factory.mktemp("nested") / "nested.pkl"
    path.write_bytes(pickle.dumps(value, protocol=4))
    limits = PickleLimits(max_depth=100)
    if depth <= 100:
        assert safe_load(path, limits) == value
    else:
        with pytest.raises(DataError, match="nested deeper than 100") as info:
            safe_load(path, limits)
        assert_reports_file_and_problem(str(info.value), path.name)


# --------------------------------------------------------------------------------------------
# Defence in depth: the sandboxed conversion and its cache


def test_conversion_reads_the_pickle_once_then_only_the_cache(tmp_path: Path, monkeypatch) -> None:
    path = write_pickle(
        tmp_path / "mosi_data.pkl", mult_content("mosi", sizes={"train": 6, "valid": 3, "test": 3})
    )
    lines: list[str] = []
    first = cached_pickle_dataset(path, "mosi-pkl", tmp_path / "cache", lines.append)
    assert any("sandboxed" in line for line in lines)
    (entry,) = (tmp_path / "cache").iterdir()
    assert oct((entry / "arrays.npz").stat().st_mode & 0o777) == oct(0o666 & ~_umask())

    def no_second_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr("streams.pickle_cache.convert_in_child", no_second_conversion)
    second = cached_pickle_dataset(path, "mosi-pkl", tmp_path / "cache", lines.append)
    for split in ("train", "valid", "test"):
        for modality in first.modalities:
            np.testing.assert_array_equal(
                first.splits[split].features[modality], second.splits[split].features[modality]
            )
        np.testing.assert_array_equal(first.splits[split].labels, second.splits[split].labels)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.parametrize(
    ("what", "make_limits", "expected"),
    [
        ("cpu", lambda: (1, 2**31), "s of CPU time"),
        ("memory", lambda: (60, 1), "memory|crashed"),
    ],
)
def test_child_limits_become_one_line_errors(
    tmp_path: Path, what: str, make_limits: Callable[[], tuple[int, int]], expected: str
) -> None:
    # A valid pickle far too big for the limits: 3 million integers, read one opcode at a time.
    path = tmp_path / "mosi_data.pkl"
    if what == "cpu":
        path.write_bytes(pickle.dumps(list(range(3_000_000)), protocol=4))
    else:
        path.write_bytes(pickle.dumps(b"\0" * 50_000_000, protocol=4))
    with pytest.raises(DataError, match=expected) as info:
        convert_in_child(
            path, "mosi-pkl", tmp_path / "cache" / "entry", lambda _: None, make_limits()
        )
    assert_reports_file_and_problem(str(info.value), path.name)
    assert not (tmp_path / "cache" / "entry").exists()
