"""Property tests: the feature-pickle loaders and the safe unpickler under damaged input.

Each example damages one small valid file in a published layout (MulT's ``mosi_data.pkl`` and
``iemocap_data.pkl``, MMSA's ``aligned_50.pkl`` and ``unaligned_39.pkl``) and loads it through
the stream lookup and through the direct loader. Either a valid dataset comes back (only if the
damage can have left the file valid) or a ``DataError`` naming the file and the problem; any
other exception fails the test. See ``tests/fuzzing.py`` for the damage and the property.
"""

from __future__ import annotations

import collections
import functools
import math
import pickle
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fuzzing import (
    Damaged,
    Verdict,
    assert_reports_file_and_problem,
    check_loader_outcome,
    damaged_bytes,
)
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pickle_fixtures import mmsa_content, mult_content

from cmmm.data.dataset import MultimodalDataset
from cmmm.errors import DataError
from streams.pickles import load_mmsa_pickle, load_mult_pickle, load_pickle_stream
from streams.safe_pickle import safe_load

SPLITS = ("train", "valid", "test")
FEATURE_KEYS = ("audio", "vision", "text")
# One sentiment score per sample, as the loader's documentation lists them.
REGRESSION_LABEL_TAILS = ((), (1,), (1, 1))


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class PickleCase:
    """A published pickle layout: where the stream lookup finds it and how to build one."""

    stream: str
    file_name: str
    label_key: str
    # The per-sample label shapes the format allows: (N, *tail).
    label_tails: tuple[tuple[int, ...], ...]
    make_content: Callable[[], dict[str, Any]]
    load_direct: Callable[[Path], MultimodalDataset]

    def role(self, key: str) -> str:
        """What ``key`` of a split is to the loader: a feature, the label, or unused metadata."""
        if key in FEATURE_KEYS:
            return "feature"
        return "label" if key == self.label_key else "metadata"


SMALL_SPLITS = {"train": 9, "valid": 4, "test": 4}
CASES = (
    PickleCase(
        "mosi-pkl",
        "mosi_data.pkl",
        "labels",
        REGRESSION_LABEL_TAILS,
        lambda: mult_content("mosi", sizes=SMALL_SPLITS, seq_len=3),
        lambda path: load_mult_pickle(path, "mosi", log=_quiet),
    ),
    PickleCase(
        "iemocap",
        "iemocap_data.pkl",
        "labels",
        ((4, 2),),
        lambda: mult_content("iemocap", sizes=SMALL_SPLITS, seq_len=3),
        lambda path: load_mult_pickle(path, "iemocap", log=_quiet),
    ),
    PickleCase(
        "mosi-pkl",
        "aligned_50.pkl",
        "regression_labels",
        REGRESSION_LABEL_TAILS,
        lambda: mmsa_content(sizes=SMALL_SPLITS, lengths={"text": 3, "audio": 3, "vision": 3}),
        lambda path: load_mmsa_pickle(path, "mosi", log=_quiet),
    ),
    PickleCase(
        "sims",
        "unaligned_39.pkl",
        "regression_labels",
        REGRESSION_LABEL_TAILS,
        lambda: mmsa_content(
            sizes=SMALL_SPLITS, lengths={"text": 3, "audio": 4, "vision": 2}, label_range=1.0
        ),
        lambda path: load_mmsa_pickle(path, "sims", log=_quiet),
    ),
)
CASE_IDS = [f"{case.stream}-{case.file_name}" for case in CASES]


@dataclass(frozen=True)
class DamagedContent:
    """A file's dict after damage, what was done, and whether the used arrays are untouched."""

    content: object
    what: str
    verdict: Verdict
    # True when only unused metadata (or nothing read) changed: the loaded arrays must then be
    # exactly those of the undamaged file.
    same_data: bool = False

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        # How Hypothesis shows a failing example: by what was done, not by the arrays.
        printer.text(f"DamagedContent({self.what!r}, {self.verdict})")


# --------------------------------------------------------------------------------------------
# Damage to the dict a pickle holds

# Values that are not arrays at all, in place of one.
NOT_ARRAYS: tuple[object, ...] = (
    None,
    "a string",
    b"bytes",
    {},
    {"a": 1},
    [[1.0], [1.0, 2.0]],  # ragged
    3.5,
    [],
    {1, 2},
    (1, "x"),
)
WRONG_DTYPES = ("object", "str", "complex", "bool", "int8", "int64", "float16", "float64")
# Casting to these keeps a numeric array a loader can accept.
NUMERIC_DTYPES = {"bool", "int8", "int64", "float16", "float64"}


def _reshapes(array: np.ndarray) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Shape damage applicable to ``array``: wrong rank, wrong row count, empty axes."""
    ops: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "add a trailing axis": lambda a: a[..., None],
        "flatten": lambda a: a.reshape(-1),
        "make it a 0-d array": lambda a: np.asarray(a.reshape(-1)[0] if a.size else 0.0),
    }
    if array.ndim >= 1 and array.shape[0] >= 1:
        ops["drop the last row"] = lambda a: a[:-1]
        ops["empty the first axis"] = lambda a: a[:0]
    if array.ndim >= 1 and array.shape[-1] >= 1:
        ops["drop the last axis"] = lambda a: a[..., 0]
    if array.ndim >= 2:
        ops["empty the second axis"] = lambda a: a[:, :0]
        ops["swap first and last axes"] = lambda a: np.swapaxes(a, 0, -1)
    return ops


def _shape_verdict(case: PickleCase, role: str, old: np.ndarray, new: np.ndarray) -> Verdict:
    if role == "metadata":
        return Verdict.VALID
    if new.shape == old.shape:
        # e.g. swapping two axes of equal length: a valid array with scrambled values
        return Verdict.MAYBE_VALID
    if role == "label" and new.shape[:1] == old.shape[:1] and new.shape[1:] in case.label_tails:
        return Verdict.VALID
    return Verdict.INVALID


@st.composite
def damaged_content(draw: st.DrawFn, case: PickleCase) -> DamagedContent:
    content = case.make_content()
    kind = draw(
        st.sampled_from(
            [
                "missing split",
                "extra entry",
                "missing key",
                "wrong shape",
                "wrong dtype",
                "non-finite values",
                "beyond float32",
                "not an array",
                "not a dict",
                "split not a dict",
            ]
        )
    )
    split = draw(st.sampled_from(SPLITS))
    entry = content[split]
    key = draw(st.sampled_from(sorted(entry)))
    role = case.role(key)

    if kind == "missing split":
        del content[split]
        return DamagedContent(content, f"split {split} removed", Verdict.INVALID)
    if kind == "extra entry":
        name = "extra_" + draw(st.text(max_size=6))
        value = draw(st.sampled_from(NOT_ARRAYS + (np.zeros((2, 3)),)))
        target = draw(st.sampled_from([content, entry]))
        target[name] = value
        where = "top level" if target is content else split
        return DamagedContent(
            content, f"extra {name!r}={value!r} in {where}", Verdict.VALID, same_data=True
        )
    if kind == "missing key":
        del entry[key]
        verdict = Verdict.VALID if role == "metadata" else Verdict.INVALID
        return DamagedContent(content, f"{split}/{key} removed", verdict, role == "metadata")
    if kind == "not an array":
        value = draw(st.sampled_from(NOT_ARRAYS))
        entry[key] = value
        verdict = Verdict.VALID if role == "metadata" else Verdict.INVALID
        return DamagedContent(content, f"{split}/{key} = {value!r}", verdict, role == "metadata")
    if kind == "not a dict":
        replacement = draw(st.sampled_from([[content[s] for s in SPLITS], None, (1, 2), 7]))
        return DamagedContent(replacement, f"top level is {type(replacement)}", Verdict.INVALID)
    if kind == "split not a dict":
        content[split] = draw(st.sampled_from([list(entry.values()), None, np.zeros(3)]))
        return DamagedContent(content, f"split {split} is not a dict", Verdict.INVALID)

    old = np.asarray(entry[key])
    if kind == "wrong shape":
        ops = _reshapes(old)
        op = draw(st.sampled_from(sorted(ops)))
        new = ops[op](old)
        entry[key] = new
        verdict = _shape_verdict(case, role, old, new)
        return DamagedContent(
            content, f"{split}/{key} {old.shape}: {op} -> {new.shape}", verdict, role == "metadata"
        )
    if kind == "wrong dtype":
        # Text and object metadata cannot become numbers; it can still become the other two.
        dtypes = ("object", "str") if old.dtype.kind in "OUS" else WRONG_DTYPES
        dtype = draw(st.sampled_from(dtypes))
        entry[key] = old.astype(dtype)
        if role == "metadata":
            verdict = Verdict.VALID
        elif dtype in NUMERIC_DTYPES:
            verdict = Verdict.MAYBE_VALID  # numeric, though values may change (or overflow)
        else:
            verdict = Verdict.INVALID
        return DamagedContent(
            content, f"{split}/{key} cast {old.dtype} -> {dtype}", verdict, role == "metadata"
        )

    # Value damage needs a float array with something in it.
    floats = [
        k for k, v in entry.items() if isinstance(v, np.ndarray) and v.dtype.kind == "f" and v.size
    ]
    key = draw(st.sampled_from(sorted(floats)))
    role = case.role(key)
    array = entry[key].copy()
    flat = array.reshape(-1)
    positions = draw(
        st.lists(st.integers(0, flat.size - 1), min_size=1, max_size=min(5, flat.size), unique=True)
    )
    if kind == "non-finite values":
        values = draw(
            st.lists(
                st.sampled_from([math.nan, math.inf, -math.inf]),
                min_size=len(positions),
                max_size=len(positions),
            )
        )
        flat[positions] = values
        entry[key] = array
        if role == "metadata" or (key == "audio" and all(v == -math.inf for v in values)):
            # Unused; or COVAREP's -inf for silence, which both upstream loaders set to 0.
            verdict = Verdict.VALID
        else:
            verdict = Verdict.INVALID
        return DamagedContent(
            content, f"{split}/{key}[{positions}] = {values}", verdict, role == "metadata"
        )
    # "beyond float32": finite in float64, infinite once converted to the float32 the model uses.
    wide = array.astype(np.float64)
    magnitude = draw(st.floats(min_value=1e39, max_value=1e300))
    wide.reshape(-1)[positions] = magnitude
    entry[key] = wide
    if role == "metadata":
        verdict = Verdict.VALID
    elif role == "feature" or case.label_tails == REGRESSION_LABEL_TAILS:
        verdict = Verdict.INVALID
    else:
        # IEMOCAP: a huge entry makes a row "no emotion marked", which is dropped, not an error.
        verdict = Verdict.MAYBE_VALID
    return DamagedContent(
        content, f"{split}/{key}[{positions}] = {magnitude:g}", verdict, role == "metadata"
    )


# --------------------------------------------------------------------------------------------
# The properties


@contextmanager
def stream_directory(case: PickleCase, content: bytes) -> Iterator[tuple[Path, Path]]:
    """A fresh data directory holding ``content`` where the stream lookup looks for it."""
    sub_dir = {"mosi-pkl": "mosi", "iemocap": "iemocap", "sims": "sims"}[case.stream]
    with tempfile.TemporaryDirectory(prefix="cmmm-fuzz-") as tmp:
        path = Path(tmp) / sub_dir / case.file_name
        path.parent.mkdir()
        path.write_bytes(content)
        yield Path(tmp), path


def _assert_same_data(loaded: MultimodalDataset, clean: MultimodalDataset) -> None:
    for split_name in SPLITS:
        got, want = loaded.splits[split_name], clean.splits[split_name]
        np.testing.assert_array_equal(got.labels, want.labels)
        assert got.labels.dtype == want.labels.dtype
        for modality in clean.modalities:
            np.testing.assert_array_equal(got.features[modality], want.features[modality])


def check_both_entry_points(
    case: PickleCase, damaged: Damaged, clean: MultimodalDataset | None = None
) -> None:
    """The stream lookup and the direct loader both keep the property on ``damaged``."""
    with stream_directory(case, damaged.content) as (data_dir, path):
        for load in (
            lambda: load_pickle_stream(case.stream, data_dir, log=_quiet),
            lambda: case.load_direct(path),
        ):
            dataset = check_loader_outcome(load, damaged, case.file_name)
            if dataset is not None:
                dataset.validate()
                if clean is not None:
                    _assert_same_data(dataset, clean)


@functools.cache
def clean_file(case: PickleCase) -> tuple[bytes, MultimodalDataset]:
    """``case``'s valid file and what it loads to (a function, not a fixture, so that Hypothesis
    does not print it with every failing example)."""
    content = pickle.dumps(case.make_content(), protocol=4)
    with stream_directory(case, content) as (_, path):
        return content, case.load_direct(path)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@given(data=st.data())
def test_pickle_loaders_survive_byte_damage(case: PickleCase, data: st.DataObject) -> None:
    valid, _ = clean_file(case)
    damaged = data.draw(damaged_bytes(valid), label="damage")
    check_both_entry_points(case, damaged)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@given(data=st.data())
def test_pickle_loaders_survive_damaged_arrays(case: PickleCase, data: st.DataObject) -> None:
    _, clean = clean_file(case)
    damage = data.draw(damaged_content(case), label="damage")
    protocol = data.draw(st.integers(0, pickle.HIGHEST_PROTOCOL), label="protocol")
    content = pickle.dumps(damage.content, protocol=protocol)
    damaged = Damaged(content, damage.what, damage.verdict)
    check_both_entry_points(case, damaged, clean if damage.same_data else None)


# --------------------------------------------------------------------------------------------
# The safe unpickler on its own

ADMITTED_TYPES = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    bytearray,
    list,
    tuple,
    dict,
    collections.OrderedDict,
    set,
    frozenset,
    np.ndarray,
    np.generic,
    np.dtype,
)


def _assert_only_admitted_types(value: object, seen: set[int] | None = None) -> None:
    """``value`` is built of plain containers, numbers, strings and numpy values only."""
    seen = set() if seen is None else seen
    if id(value) in seen:  # a pickle can build self-referencing containers
        return
    seen.add(id(value))
    # A global (say, the class numpy.dtype) left as a value instead of being called is refused
    # by the reader, so it never gets here.
    assert isinstance(value, ADMITTED_TYPES), f"unpickled a {type(value)}"
    if isinstance(value, dict):
        children: list[object] = [*value.keys(), *value.values()]
    elif isinstance(value, list | tuple | set | frozenset):
        children = list(value)
    elif isinstance(value, np.ndarray) and value.dtype.kind == "O":
        children = list(value.reshape(-1))
    else:
        children = []
    for child in children:
        _assert_only_admitted_types(child, seen)


@contextmanager
def pickle_file(content: bytes) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="cmmm-fuzz-") as tmp:
        path = Path(tmp) / "fuzzed.pkl"
        path.write_bytes(content)
        yield path


@given(data=st.data())
def test_safe_load_returns_plain_values_or_a_data_error(data: st.DataObject) -> None:
    case = data.draw(st.sampled_from(CASES), label="file")
    damaged = data.draw(damaged_bytes(clean_file(case)[0]), label="damage")
    with pickle_file(damaged.content) as path:
        loaded = check_loader_outcome(lambda: safe_load(path), damaged, path.name)
    if loaded is not None:
        _assert_only_admitted_types(loaded)


# Callables a hostile pickle would reach for, each with arguments that would leave a mark.
def _hostile_calls(marker: Path) -> list[tuple[str, str, tuple[object, ...]]]:
    return [
        ("os", "system", (f"touch {marker}",)),
        ("posix", "system", (f"touch {marker}",)),
        ("builtins", "exec", (f"open({str(marker)!r}, 'w').close()",)),
        ("builtins", "eval", (f"open({str(marker)!r}, 'w').close()",)),
        ("__builtin__", "eval", (f"open({str(marker)!r}, 'w').close()",)),
        ("subprocess", "Popen", (["touch", str(marker)],)),
        ("builtins", "open", (str(marker), "w")),
        ("pathlib", "Path.touch", (str(marker),)),
        ("numpy", "save", (str(marker), 0)),
        ("builtins", "getattr", ("os", "system")),
        ("copy_reg", "_reconstructor", (object, object, None)),
    ]


def _stack_global_call(module: str, name: str, args: tuple[object, ...]) -> bytes:
    """Protocol-4 opcodes: push module and name, STACK_GLOBAL, push args, REDUCE, STOP."""

    def unicode(text: str) -> bytes:
        raw = text.encode("utf-8", "surrogatepass")
        return b"\x8d" + struct.pack("<Q", len(raw)) + raw  # BINUNICODE8

    # The arguments are pickled on their own and spliced in without their PROTO and STOP.
    args_opcodes = pickle.dumps(args, protocol=4)[2:-1]
    if args_opcodes.startswith(b"\x95"):  # FRAME header
        args_opcodes = args_opcodes[9:]
    return b"\x80\x04" + unicode(module) + unicode(name) + b"\x93" + args_opcodes + b"R."


# The modules of the few admitted globals, under their Python 3 and Python 2 names; random
# names are drawn outside them, so every one must be refused.
ADMITTING_MODULES = {
    "numpy",
    "numpy.core.multiarray",
    "numpy._core.multiarray",
    "numpy.core.numeric",
    "numpy._core.numeric",
    "collections",
    "_codecs",
    "builtins",
    "__builtin__",
}


@given(data=st.data())
def test_safe_load_refuses_every_other_global_and_runs_nothing(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory(prefix="cmmm-fuzz-") as tmp:
        marker = Path(tmp) / "pwned"
        hostile = _hostile_calls(marker)
        module, name, args = data.draw(
            st.one_of(
                st.sampled_from(hostile),
                st.tuples(st.text(max_size=12), st.text(max_size=12), st.just(())).filter(
                    lambda call: call[0] not in ADMITTING_MODULES
                ),
            ),
            label="global",
        )
        content = _stack_global_call(module, name, args)
        with pickle_file(content) as path:
            with pytest.raises(DataError, match="refusing to load") as refused:
                safe_load(path)
            assert_reports_file_and_problem(str(refused.value), path.name)
        assert not marker.exists(), f"{module}.{name} ran"


class _Rebuilt:
    """Pickles as ``factory(*args)`` followed by BUILD with ``state``: how numpy pickles arrays
    and dtypes, with any state we like."""

    def __init__(self, factory: object, args: tuple[object, ...], state: object) -> None:
        self.reduced = (factory, args, state)

    def __reduce__(self) -> tuple[object, ...]:
        return self.reduced


_STATE_PARTS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.sampled_from(["<", ">", "|", "=", "x"]),
    st.sampled_from([np.dtype("f4"), np.dtype("O"), np.dtype("U3"), np.dtype([("a", "f4")])]),
    st.lists(st.one_of(st.integers(-3, 40), st.integers(0, 10**6)), max_size=4).map(tuple),
    st.binary(max_size=64),
    st.lists(st.one_of(st.none(), st.text(max_size=2)), max_size=30),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)


@st.composite
def near_valid_state(draw: st.DrawFn, valid: tuple[object, ...]) -> tuple[object, ...]:
    """``valid`` with one to three parts replaced, dropped or added."""
    parts = list(valid)
    for _ in range(draw(st.integers(1, 3))):
        change = draw(st.sampled_from(["replace", "drop", "add"]))
        if change == "add" or not parts:
            parts.insert(draw(st.integers(0, len(parts))), draw(_STATE_PARTS))
        elif change == "replace":
            parts[draw(st.integers(0, len(parts) - 1))] = draw(_STATE_PARTS)
        else:
            del parts[draw(st.integers(0, len(parts) - 1))]
    return tuple(parts)


_ARRAY_EXAMPLES = (
    np.arange(6, dtype=np.float32).reshape(2, 3),
    np.array([b"ab", b"c"], dtype=object),
    np.array(["x", "yz"]),
    np.zeros((0, 2), dtype=np.int64),
)
_DTYPE_EXAMPLES = tuple(np.dtype(code) for code in ("f4", ">f8", "i1", "O", "U5", "S3", "?"))


def _assert_state_applied(loaded: object, state: tuple[object, ...]) -> None:
    """A loaded array or dtype is what its state says, read independently of numpy's pickling.

    An object array's state lists its items; one whose shape asks for more items than the list
    holds used to be built from memory past the list (garbage, or a crash).
    """
    if isinstance(loaded, np.dtype):
        assert loaded.__reduce__()[2][2:] == state[2:], (loaded, state)
        return
    assert isinstance(loaded, np.ndarray), type(loaded)
    shape, dtype, fortran, items = state[-4], state[-3], state[-2], state[-1]
    assert loaded.shape == tuple(shape) and loaded.dtype == dtype, (loaded, state)
    order = "F" if fortran else "C"
    if dtype.hasobject:
        assert isinstance(items, list) and len(items) == loaded.size, (loaded, state)
        assert loaded.reshape(-1, order=order).tolist() == items
    else:
        assert loaded.tobytes(order=order) == bytes(items), (loaded, state)


@given(data=st.data())
def test_safe_load_survives_malformed_array_and_dtype_states(data: st.DataObject) -> None:
    # numpy applies these states without checking them; before the unpickler checked them, one
    # flipped byte in a feature pickle crashed the interpreter (see streams/safe_pickle.py).
    if data.draw(st.booleans(), label="array, not dtype"):
        array = data.draw(st.sampled_from(_ARRAY_EXAMPLES), label="array")
        factory, args, valid_state = array.__reduce__()
    else:
        dtype = data.draw(st.sampled_from(_DTYPE_EXAMPLES), label="dtype")
        factory, args, valid_state = dtype.__reduce__()
    state = data.draw(near_valid_state(valid_state), label="state")
    protocol = data.draw(st.sampled_from([2, 4]), label="protocol")
    content = pickle.dumps({"value": _Rebuilt(factory, args, state)}, protocol=protocol)
    damaged = Damaged(content, f"state {state!r}", Verdict.MAYBE_VALID)
    with pickle_file(content) as path:
        loaded = check_loader_outcome(lambda: safe_load(path), damaged, path.name)
    if loaded is not None:
        _assert_state_applied(loaded["value"], state)


# Every value the published files need, nested the way they nest them.
_ARRAY_DTYPES = st.sampled_from(
    ["float32", "float64", "int8", "int64", "uint16", "bool", "complex64", "<U4", "S3"]
)
_ARRAYS = _ARRAY_DTYPES.flatmap(
    lambda dtype: hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=3, max_side=3))
)
_HASHABLE = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5))
_LEAVES = st.one_of(
    _HASHABLE,
    st.floats(),
    st.complex_numbers(),
    st.binary(max_size=5),
    st.binary(max_size=5).map(bytearray),
    _ARRAYS,
    st.floats(width=32).map(np.float32),
    st.integers(-(2**31), 2**31 - 1).map(np.int64),
    st.lists(st.text(max_size=4), max_size=3).map(lambda items: np.array(items, dtype=object)),
)
PLAIN_VALUES = st.recursive(
    _LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=5), children, max_size=3),
        st.dictionaries(st.text(max_size=5), children, max_size=3).map(collections.OrderedDict),
        st.sets(_HASHABLE, max_size=3),
        st.frozensets(_HASHABLE, max_size=3),
    ),
    max_leaves=12,
)


def _assert_same_value(got: object, want: object) -> None:
    assert type(got) is type(want), (type(got), type(want))
    if isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.shape == want.shape  # type: ignore[union-attr]
        nan_is_a_value = want.dtype.kind in "fc"
        assert np.array_equal(got, want, equal_nan=nan_is_a_value)  # type: ignore[arg-type]
    elif isinstance(want, dict):
        assert list(got) == list(want)  # type: ignore[call-overload]
        for key in want:
            _assert_same_value(got[key], want[key])  # type: ignore[index]
    elif isinstance(want, list | tuple):
        assert len(got) == len(want)  # type: ignore[arg-type]
        for g, w in zip(got, want, strict=True):  # type: ignore[call-overload]
            _assert_same_value(g, w)
    elif isinstance(want, float | complex | np.floating):
        assert got == want or (got != got and want != want)  # NaN is NaN
    else:
        assert got == want


@given(value=PLAIN_VALUES, protocol=st.integers(0, pickle.HIGHEST_PROTOCOL))
def test_safe_load_reads_back_every_plain_value(value: object, protocol: int) -> None:
    with pickle_file(pickle.dumps(value, protocol=protocol)) as path:
        loaded = safe_load(path)
    _assert_same_value(loaded, value)
