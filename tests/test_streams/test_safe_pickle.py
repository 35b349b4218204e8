from __future__ import annotations

import builtins
import collections
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pickle_fixtures import mmsa_content, python2_array_pickle_bytes, write_pickle

from cmmm.errors import DataError
from streams.safe_pickle import safe_load


class _RunsShell:
    """Unpickling this would run a shell command that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


class _RunsExec:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


class _RunsPopen:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[list[str]]]:
        return (subprocess.Popen, (["touch", str(self.marker)],))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_numpy_arrays_and_containers_round_trip(tmp_path: Path, protocol: int) -> None:
    content = {
        "floats": np.arange(12, dtype=np.float32).reshape(2, 3, 2),
        "ints": np.array([[1, 2], [3, 4]], dtype=np.int64),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
        "strings": np.array(["naïve", "b"], dtype=object),
        "fixed_bytes": np.array([b"ab", b"c"]),
        "scalar": np.float32(2.5),
        "ordered": collections.OrderedDict(a=1, b=[1.0, "x"]),
        "tuple": (1, None, True),
        "set": {1, 2},
    }
    path = write_pickle(tmp_path / "ok.pkl", content, protocol=protocol)

    loaded = safe_load(path)

    assert isinstance(loaded, dict) and set(loaded) == set(content)
    for key in ("floats", "ints", "fortran", "fixed_bytes"):
        np.testing.assert_array_equal(loaded[key], content[key])
        assert loaded[key].dtype == content[key].dtype
    assert loaded["strings"].tolist() == ["naïve", "b"]
    assert loaded["scalar"] == np.float32(2.5) and loaded["scalar"].dtype == np.float32
    assert loaded["ordered"] == content["ordered"]
    assert loaded["tuple"] == (1, None, True)
    assert loaded["set"] == {1, 2}


def test_mmsa_layout_with_object_arrays_and_lists_loads(tmp_path: Path) -> None:
    content = mmsa_content(sizes={"train": 3, "valid": 2, "test": 2})
    loaded = safe_load(write_pickle(tmp_path / "aligned_50.pkl", content))
    assert loaded["train"]["raw_text"].tolist() == content["train"]["raw_text"].tolist()
    assert loaded["test"]["audio_lengths"] == content["test"]["audio_lengths"]
    np.testing.assert_array_equal(loaded["valid"]["vision"], content["valid"]["vision"])


@pytest.mark.parametrize("payload", [_RunsShell, _RunsExec, _RunsPopen])
@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_hostile_pickle_is_refused_and_runs_nothing(
    tmp_path: Path, payload: type, protocol: int
) -> None:
    marker = tmp_path / "pwned"
    # Hidden where a feature array would be, so the loader has to reach it.
    content = {"train": {"text": np.zeros((1, 1, 1)), "audio": payload(marker)}}
    path = write_pickle(tmp_path / "hostile.pkl", content, protocol=protocol)

    with pytest.raises(DataError) as info:
        safe_load(path)

    assert not marker.exists()
    message = str(info.value)
    assert "refusing to load" in message and "hostile.pkl" in message
    assert any(name in message for name in ("system", "exec", "Popen"))


def test_hostile_object_inside_numpy_object_array_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    array = np.empty(2, dtype=object)
    array[0], array[1] = "fine", _RunsShell(marker)
    path = write_pickle(tmp_path / "objarr.pkl", {"raw_text": array})

    with pytest.raises(DataError, match="refusing to load .*system.*objarr.pkl"):
        safe_load(path)
    assert not marker.exists()


def test_codec_other_than_latin1_is_refused(tmp_path: Path) -> None:
    # GLOBAL _codecs.encode, then ("x", "rot13") and REDUCE.
    path = tmp_path / "codec.pkl"
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(DataError, match="codec.pkl"):
        safe_load(path)


@pytest.mark.parametrize(
    "content",
    [b"", b"this is not a pickle at all", b"\x80\x04\x95"],
    ids=["empty", "text", "header-only"],
)
def test_garbage_is_reported_as_not_a_pickle(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.pkl"
    path.write_bytes(content)
    with pytest.raises(DataError, match="garbage.pkl is truncated or not a pickle"):
        safe_load(path)


def test_truncated_pickle_is_reported(tmp_path: Path) -> None:
    full = write_pickle(tmp_path / "full.pkl", mmsa_content()).read_bytes()
    path = tmp_path / "cut.pkl"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match="cut.pkl is truncated or not a pickle"):
        safe_load(path)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nothere.pkl"):
        safe_load(tmp_path / "nothere.pkl")


def test_python2_array_pickle_loads_via_latin1(tmp_path: Path) -> None:
    values = np.array([1.5, -2.25, 300.0, 1e-3], dtype=np.float32)
    raw = python2_array_pickle_bytes("audio", values)
    # The buffer holds bytes >= 0x80, so the default ASCII decoding cannot read this file.
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(raw)
    path = tmp_path / "py2.pkl"
    path.write_bytes(raw)

    loaded = safe_load(path)

    assert list(loaded) == ["audio"]
    assert loaded["audio"].dtype == np.float32
    np.testing.assert_array_equal(loaded["audio"], values)
