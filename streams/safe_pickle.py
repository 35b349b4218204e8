"""Load the published feature pickles without letting them run code.

A pickle may name any importable callable and have the loader call it, so ``pickle.load`` on a
file from the internet is arbitrary code execution. The feature files we read (MulT's
``*_data.pkl``, MMSA's ``Processed/*.pkl``) only ever hold dicts, lists and strings (which the
pickle format encodes natively) and numpy arrays, whose reconstruction needs a handful of numpy
functions. ``safe_load`` admits exactly those and refuses every other global before it is called.
"""

from __future__ import annotations

import _compat_pickle
import collections
import math
import operator
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cmmm.errors import DataError, one_line

try:  # numpy >= 2 moved the array machinery to numpy._core; numpy.core is a deprecated alias.
    from numpy import _core as _numpy_core
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy import core as _numpy_core  # type: ignore[no-redef]

# Both spellings occur in the wild: files written under numpy 1.x say ``numpy.core``, files
# written under numpy 2.x say ``numpy._core``. They are mapped to whichever module this numpy has,
# so importing the deprecated alias (and its warning) is never needed.
_NUMPY_CORE_MODULES = ("numpy.core", "numpy._core")


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    # Protocol-2 pickles written by Python 3 store bytes (an array's raw buffer) as
    # ``_codecs.encode(text, "latin1")``. Any other codec is not needed and not admitted, so the
    # codec registry (and the modules it would import) stays out of reach.
    if encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


def _empty_bytes(*args: object) -> bytes:
    # Protocols 0-2 written by Python 3 store ``b""`` as ``bytes()`` (other bytes go through
    # ``_codecs.encode``), e.g. the buffer of an empty array. Arguments are not needed, and
    # refused: ``bytes(n)`` would let a file allocate any amount of memory.
    if args:
        raise pickle.UnpicklingError("bytes() with arguments is not allowed")
    return b""


def _allowed_globals() -> dict[tuple[str, str], Callable[..., object]]:
    allowed: dict[tuple[str, str], Callable[..., object]] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("_codecs", "encode"): _latin1_encode,
        ("builtins", "bytes"): _empty_bytes,
        # Containers and values that protocols < 4 cannot encode with an opcode of their own.
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "bytearray"): bytearray,
        ("builtins", "complex"): complex,
    }
    for core in _NUMPY_CORE_MODULES:
        allowed[(f"{core}.multiarray", "_reconstruct")] = _numpy_core.multiarray._reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = _numpy_core.multiarray.scalar
        # Protocol-5 pickles of contiguous arrays are rebuilt with _frombuffer.
        allowed[(f"{core}.numeric", "_frombuffer")] = _numpy_core.numeric._frombuffer
    return allowed


_ALLOWED_GLOBALS = _allowed_globals()


class _RefusedGlobal(Exception):
    """Raised inside the unpickler so the refusal is not mistaken for a malformed file."""

    def __init__(self, qualified_name: str) -> None:
        super().__init__(qualified_name)
        self.qualified_name = qualified_name


def _check_array_state(state: object) -> None:
    """Refuse an object array's state that numpy would trust blindly.

    ``ndarray.__setstate__`` copies an object array's items from a list without checking its
    length against the shape: a list shorter than the shape makes numpy read past its end and
    crash the interpreter (found by tests/test_fuzz_loaders.py: one flipped byte in a shape).
    The published files only hold plain object arrays (strings, ids), so structured or
    sub-array dtypes holding objects are refused outright.
    """
    # (version, shape, dtype, is_fortran, data), or without the version in old pickles.
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        return  # numpy refuses malformed states itself
    shape, dtype, data = state[-4], state[-3], state[-1]
    if not isinstance(dtype, np.dtype) or not dtype.hasobject:
        return  # raw bytes, whose length numpy does check
    if dtype != np.dtype(object):
        raise pickle.UnpicklingError(f"an array of dtype {dtype} holding objects is not allowed")
    try:
        size = math.prod(operator.index(side) for side in shape)
    except TypeError:
        raise pickle.UnpicklingError(
            f"an array's shape must be whole numbers, got {shape!r}"
        ) from None
    if not isinstance(data, list) or len(data) != size:
        given = f"{len(data)} items" if isinstance(data, list) else type(data).__name__
        raise pickle.UnpicklingError(
            f"an object array of shape {tuple(shape)} needs a list of {size} items, got {given}"
        )


_BYTE_ORDERS = ("<", ">", "=")


def _check_dtype_state(dtype: np.dtype, state: object) -> None:
    """Refuse a dtype state other than the one numpy itself writes for this dtype.

    ``dtype.__setstate__`` trusts its input: a malformed state (one flipped byte turned
    ``(3, '<', None, None, None, -1, -1, 0)`` into ``(3, '<', 20046, -1, -1, 0)``) crashes the
    interpreter, and a forged flags field could make numpy take float bytes for object pointers.
    The published files only hold plain dtypes, whose state is fixed by the dtype the file
    constructed; only the byte order may differ (a file written on a big-endian machine).
    """
    expected = dtype.__reduce__()[2]
    if not isinstance(state, tuple) or len(state) != len(expected):
        raise pickle.UnpicklingError(f"malformed state for dtype {dtype}: {state!r}")
    byte_order, expected_order = state[1], expected[1]
    orders = ("|",) if expected_order == "|" else _BYTE_ORDERS
    if byte_order not in orders or state[:1] + state[2:] != expected[:1] + expected[2:]:
        raise pickle.UnpicklingError(
            f"state {state!r} for dtype {dtype} is not the one numpy writes ({expected!r}); "
            "structured and other unusual dtypes are not allowed"
        )


class _RestrictedUnpickler(pickle._Unpickler):
    """Python's own (pure-Python) unpickler, restricted.

    Not the faster C one (``pickle.Unpickler``): only this one lets an opcode be overridden, and
    BUILD must be, to check the state of an array or a dtype before numpy applies it (numpy
    trusts it, and crashes on a malformed one). It costs about 20% more time on a feature file.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def load_build(self) -> None:
        # The stack holds [..., instance, state]; BUILD applies the state to the instance.
        if len(self.stack) >= 2:
            instance, state = self.stack[-2], self.stack[-1]
            if isinstance(instance, np.ndarray):
                _check_array_state(state)
            elif isinstance(instance, np.dtype):
                _check_dtype_state(instance, state)
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build

    def find_class(self, module: str, name: str) -> Callable[..., object]:
        # Python 2 pickles say ``__builtin__``/``copy_reg``; the stock find_class maps those to
        # their Python 3 names, and overriding it means doing the same here.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        target = _ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise _RefusedGlobal(f"{module}.{name}")
        return target


def _load_with_encoding(path: Path, encoding: str) -> object:
    with path.open("rb") as stream:
        return _RestrictedUnpickler(stream, encoding=encoding).load()


def safe_load(path: Path) -> object:
    """Unpickle ``path`` admitting only numpy arrays, numpy scalars and plain containers.

    Raises ``DataError`` naming the file if it cannot be read, is truncated or not a pickle, or
    names any other global (which is refused before anything is called).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"cannot read {path}: no such file")
    try:
        try:
            return _load_with_encoding(path, "ASCII")
        except UnicodeDecodeError:
            # Python 2 pickles store an array's raw buffer as a byte string, which only the
            # latin1 codec maps one-to-one onto str (numpy encodes it back the same way).
            return _load_with_encoding(path, "latin1")
    except _RefusedGlobal as refused:
        raise DataError(
            # repr: the name comes from the file and may hold a line break or anything else.
            f"refusing to load {refused.qualified_name!r} from {path}: only numpy arrays and plain "
            "containers are allowed; this file is not a feature pickle or may be hostile, do not "
            "load it with plain pickle"
        ) from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {one_line(exc)}") from exc
    except Exception as exc:  # whatever a malformed byte stream happens to trigger
        raise DataError(
            f"{path} is truncated or not a pickle ({type(exc).__name__}: {one_line(exc)}); "
            "download the file again"
        ) from exc
