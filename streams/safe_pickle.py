"""Read the published feature pickles with our own bounded opcode interpreter.

A pickle is a program: ``pickle.load`` calls whatever callables the file names, with whatever
arguments it chooses. Restricting the callables (what this module did before) is not enough:
``numpy.ndarray(shape, dtype, buffer)`` and ``numpy.dtype(...)`` with file-chosen arguments build
arrays whose object fields are pointers read from the file (a segfault, possibly worse), and the
format alone can build structures that crash or hang the reader (deep nesting, shared references
that expand to 2^40 elements, opcodes that declare gigabytes).

So nothing in a file is ever executed or handed to a constructor as is. ``safe_load`` walks the
opcodes (``pickletools.genops``) and builds the values itself:

* plain values and containers only (None, bool, int, float, complex, str, bytes, bytearray,
  list, tuple, dict, OrderedDict, set, frozenset);
* numpy arrays only from a validated (shape, dtype, bytes) triple through
  ``np.frombuffer(...).copy()``, the dtype from a fixed allow-list (booleans, integers, floats,
  complex, fixed-width strings); an object array only from a list of plain leaves (strings,
  numbers), put in element by element, never from bytes; no structured or datetime dtype;
* the few call patterns numpy and Python write (``_reconstruct`` + BUILD, ``dtype`` + BUILD,
  ``scalar``, ``_frombuffer``, ``_codecs.encode``, ``set``, ...) are recognised and interpreted,
  never called; any other global is refused before anything happens.

Hard limits (``PickleLimits``) bound nesting depth, number of objects, memo size and the
"expanded size" of every value: the size it would have if every shared reference were copied
out, which bounds the time any later walk (hashing, ``np.asarray``, ``str``) can take. A mutable
container may not be referenced twice at all (nor itself: no cycles). Every length the file
declares is checked against the bytes that remain before anything is read. Each refusal is a
``DataError`` naming the file and the reason.
"""

from __future__ import annotations

import _compat_pickle
import collections
import math
import pickletools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from cmmm.errors import DataError, one_line

# Longest piece of foreign text (from the file, from a parser) quoted in a message.
_DETAIL_CHARS = 160


@dataclass(frozen=True)
class PickleLimits:
    """What one pickle may build. The defaults are far above the published files' needs (a few
    hundred objects nested 3 deep, no shared containers) and far below what hurts."""

    max_depth: int = 64
    max_objects: int = 20_000_000
    max_memo: int = 20_000_000
    max_marks: int = 10_000
    # Expanded size (bytes, roughly) of any value: this many times the file's size, plus slack.
    expansion_factor: int = 4
    expansion_slack: int = 64 * 2**20
    max_ndim: int = 32
    max_string_itemsize: int = 2**20  # characters of a U<n> or bytes of an S<n> dtype
    max_int_bits: int = 4096


DEFAULT_LIMITS = PickleLimits()


class _Malformed(Exception):
    """The bytes are not a well-formed pickle (damaged, truncated or not a pickle at all)."""


class _Refused(Exception):
    """A well-formed pickle that asks for something this reader does not do."""


class _RefusedGlobal(_Refused):
    """The file names a callable other than the few admitted ones."""


def _short(text: object) -> str:
    flat = one_line(text)
    return flat if len(flat) <= _DETAIL_CHARS else flat[: _DETAIL_CHARS - 3] + "..."


# --------------------------------------------------------------------------------------------
# Reading the bytes: every declared length is checked against what the file still holds.


class _BoundedFile:
    """The file as ``genops`` reads it; a read beyond the end is an error, never an allocation.

    A buffered ``read(n)`` allocates ``n`` bytes before it knows how many are there: a 12-byte
    file declaring a 1.5 GB string got 1.5 GB. Here ``n`` is checked against the size first.
    """

    def __init__(self, handle: BinaryIO, size: int) -> None:
        self._handle = handle
        self._size = size

    def tell(self) -> int:
        return self._handle.tell()

    def read(self, n: int = -1) -> bytes:
        remaining = self._size - self._handle.tell()
        if n < 0:
            n = remaining
        if n > remaining:
            if n == 1:
                raise _Malformed("the pickle ends before its STOP opcode")
            raise _Malformed(f"an opcode declares {n} bytes but only {remaining} remain")
        data = self._handle.read(n)
        if len(data) != n:
            raise _Malformed("the file changed while it was read")
        return data

    def readline(self) -> bytes:
        return self._handle.readline()


# --------------------------------------------------------------------------------------------
# Values under construction


class _Global:
    """A global the file named and this reader admits; it is interpreted, never called."""

    def __init__(self, name: str) -> None:
        self.name = name


class _Arguments(tuple):
    """A tuple holding an admitted global: the arguments of a call only, never a value."""


class _PendingArray:
    """``_reconstruct(ndarray, (0,), b'b')``: an array waiting for its BUILD state."""

    def __init__(self) -> None:
        self.value: np.ndarray | None = None


class _PendingDtype:
    """``numpy.dtype(code, False, True)``: a dtype waiting for its BUILD state (byte order)."""

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype
        self.built = False


_LEAF_TYPES = (type(None), bool, int, float, complex, str, bytes)
_MUTABLE_CONTAINERS = (list, dict, set, bytearray)  # OrderedDict is a dict

_GLOBAL_NAMES = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),
    ("builtins", "bytes"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "bytearray"),
    ("builtins", "complex"),
}
# Files written under numpy 1.x say ``numpy.core``, under numpy 2.x ``numpy._core``.
for _core in ("numpy.core", "numpy._core"):
    _GLOBAL_NAMES |= {
        (f"{_core}.multiarray", "_reconstruct"),
        (f"{_core}.multiarray", "scalar"),
        (f"{_core}.numeric", "_frombuffer"),
    }
_CANONICAL = {
    "_reconstruct": "numpy._reconstruct",
    "scalar": "numpy.scalar",
    "_frombuffer": "numpy._frombuffer",
}

# The dtypes an array may have, as numpy pickles their code (byte order apart).
_DTYPE_CODE = re.compile(r"(b1|i[1248]|u[1248]|f[248]|c(?:8|16)|[US][1-9][0-9]{0,7}|O[48])")


def _admitted_global(module: str, name: str) -> _Global:
    # Python 2 pickles say ``__builtin__``/``copy_reg``; map them to their Python 3 names.
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    if (module, name) not in _GLOBAL_NAMES:
        # repr: the name comes from the file and may hold a line break or anything else.
        raise _RefusedGlobal(_short(repr(f"{module}.{name}")))
    if module.startswith("numpy.") and name in _CANONICAL:
        return _Global(_CANONICAL[name])
    return _Global(f"{module}.{name}")


class _Interpreter:
    """One pass over the opcodes of one file; see the module docstring for the rules."""

    def __init__(self, file_size: int, limits: PickleLimits) -> None:
        self.limits = limits
        self.file_size = file_size
        self.max_weight = limits.expansion_factor * file_size + limits.expansion_slack
        self.stack: list[object] = []
        self.marks: list[list[object]] = []
        self.memo: dict[int, object] = {}
        self.objects = 0
        # id -> (object, expanded size, depth) for containers and everything shared. The object
        # is kept so that its id cannot be reused by another one while the table lives.
        self.sizes: dict[int, tuple[object, int, int]] = {}

    # ---- accounting -----------------------------------------------------------------------

    def count(self) -> None:
        self.objects += 1
        if self.objects > self.limits.max_objects:
            raise _Refused(f"it builds more than {self.limits.max_objects} objects")

    def size_of(self, value: object) -> tuple[int, int]:
        """(expanded size, depth) of a finished value."""
        known = self.sizes.get(id(value))
        if known is not None and known[0] is value:
            return known[1], known[2]
        if isinstance(value, str | bytes | bytearray):
            return 16 + len(value), 0
        if isinstance(value, np.ndarray):
            return 64 + value.nbytes, 1
        return 16, 0

    def record(self, container: object, weight: int, depth: int) -> None:
        if depth > self.limits.max_depth:
            raise _Refused(f"containers are nested deeper than {self.limits.max_depth} levels")
        if weight > self.max_weight:
            raise _Refused(
                f"shared references expand it to more than {self.max_weight} bytes "
                "(a decompression bomb)"
            )
        self.sizes[id(container)] = (container, weight, depth)

    def new_container(self, container: object) -> object:
        self.count()
        self.record(container, 64, 1)
        return container

    def grow(self, container: object, items: list[object]) -> None:
        """Account for ``items`` put into ``container`` (a container under construction)."""
        weight, depth = self.size_of(container)
        for item in items:
            item_weight, item_depth = self.size_of(item)
            weight += item_weight
            depth = max(depth, item_depth + 1)
        self.record(container, weight, depth)

    def finished(self, container: object, items: list[object]) -> object:
        """A container built at once from ``items`` (a tuple, a frozenset, a set)."""
        self.count()
        self.record(container, 64, 1)
        self.grow(container, items)
        return container

    # ---- values ---------------------------------------------------------------------------

    def value(self, item: object, what: str = "a value") -> object:
        """``item`` as a finished value, refusing what is not one."""
        if isinstance(item, _PendingArray):
            if item.value is None:
                raise _Refused(f"an array without its data is used as {what}")
            return item.value
        if isinstance(item, _PendingDtype):
            return item.dtype
        if isinstance(item, _Global):
            raise _Refused(f"{item.name} is used as {what}, not called as numpy or Python would")
        if isinstance(item, _Arguments):
            raise _Refused(f"the arguments of a call are used as {what}")
        return item

    def values(self, items: list[object]) -> list[object]:
        return [self.value(item) for item in items]

    def pop(self) -> object:
        if not self.stack:
            raise _Malformed("an opcode needs a value but the stack is empty")
        return self.stack.pop()

    def top(self) -> object:
        if not self.stack:
            raise _Malformed("an opcode needs a value but the stack is empty")
        return self.stack[-1]

    def pop_mark(self) -> list[object]:
        if not self.marks:
            raise _Malformed("an opcode needs a MARK but there is none")
        items = self.stack
        self.stack = self.marks.pop()
        return items

    def push(self, value: object) -> None:
        self.stack.append(value)

    def push_leaf(self, value: object) -> None:
        self.count()
        self.stack.append(value)

    # ---- the opcodes ----------------------------------------------------------------------

    def run(self, opcodes: Iterator[tuple[pickletools.OpcodeInfo, object, int | None]]) -> object:
        for opcode, arg, _ in opcodes:
            name = opcode.name
            handler = getattr(self, f"op_{name}", None)
            if handler is None:
                raise _Refused(f"it uses the {name} opcode, which feature pickles never need")
            if name == "STOP":
                return self.finish()
            handler(arg)
        raise _Malformed("the pickle ends before its STOP opcode")  # pragma: no cover

    def finish(self) -> object:
        result = self.value(self.pop(), "the file's content")
        return result

    def op_STOP(self, arg: object) -> None:  # handled in run
        pass

    def op_PROTO(self, arg: object) -> None:
        if not isinstance(arg, int) or arg > 5:
            raise _Malformed(f"unknown pickle protocol {arg!r}")

    def op_FRAME(self, arg: object) -> None:
        # A hint for buffering (the opcodes that follow are read as usual), but one declaring
        # more than the file holds marks a damaged or forged file.
        if not isinstance(arg, int) or arg > self.file_size:
            raise _Malformed(f"a frame declares {arg} bytes but the file has {self.file_size}")

    def op_MARK(self, arg: object) -> None:
        if len(self.marks) >= self.limits.max_marks:
            raise _Refused(f"it opens more than {self.limits.max_marks} nested MARKs")
        self.marks.append(self.stack)
        self.stack = []

    def op_POP(self, arg: object) -> None:
        self.pop()

    def op_POP_MARK(self, arg: object) -> None:
        self.pop_mark()

    # Plain values: genops has decoded the argument already, within the file's bytes.
    def _leaf(self, arg: object) -> None:
        if isinstance(arg, int) and not isinstance(arg, bool):
            if arg.bit_length() > self.limits.max_int_bits:
                raise _Refused(f"an integer has more than {self.limits.max_int_bits} bits")
        self.push_leaf(arg)

    op_INT = op_BININT = op_BININT1 = op_BININT2 = op_LONG = op_LONG1 = op_LONG4 = _leaf
    op_FLOAT = op_BINFLOAT = _leaf
    op_STRING = op_BINSTRING = op_SHORT_BINSTRING = _leaf  # Python 2 str, decoded as latin1
    op_BINBYTES = op_SHORT_BINBYTES = op_BINBYTES8 = _leaf
    op_UNICODE = op_BINUNICODE = op_SHORT_BINUNICODE = op_BINUNICODE8 = _leaf

    def op_BYTEARRAY8(self, arg: object) -> None:
        self.push_leaf(bytearray(arg))  # type: ignore[arg-type]

    def op_NONE(self, arg: object) -> None:
        self.push_leaf(None)

    def op_NEWTRUE(self, arg: object) -> None:
        self.push_leaf(True)

    def op_NEWFALSE(self, arg: object) -> None:
        self.push_leaf(False)

    # Containers
    def op_EMPTY_LIST(self, arg: object) -> None:
        self.push(self.new_container([]))

    def op_EMPTY_DICT(self, arg: object) -> None:
        self.push(self.new_container({}))

    def op_EMPTY_SET(self, arg: object) -> None:
        self.push(self.new_container(set()))

    def op_EMPTY_TUPLE(self, arg: object) -> None:
        self.push_leaf(())

    def op_LIST(self, arg: object) -> None:
        items = self.values(self.pop_mark())
        self.push(self.finished(list(items), items))

    def op_DICT(self, arg: object) -> None:
        items = self.values(self.pop_mark())
        if len(items) % 2:
            raise _Malformed("DICT with an odd number of items")
        built: dict[object, object] = {}
        self._set_items(built, items)
        self.push(self.finished(built, items))

    def _tuple(self, items: list[object]) -> None:
        if any(isinstance(item, _Global) for item in items):
            # numpy's _reconstruct takes the class ndarray as an argument: such a tuple may only
            # be the arguments of a call, never a value.
            resolved = [item if isinstance(item, _Global) else self.value(item) for item in items]
            self.push(self.finished(_Arguments(resolved), []))
            return
        items = self.values(items)
        self.push(self.finished(tuple(items), items))

    def op_TUPLE(self, arg: object) -> None:
        self._tuple(self.pop_mark())

    def op_TUPLE1(self, arg: object) -> None:
        self._tuple([self.pop()])

    def op_TUPLE2(self, arg: object) -> None:
        second = self.pop()
        self._tuple([self.pop(), second])

    def op_TUPLE3(self, arg: object) -> None:
        third = self.pop()
        second = self.pop()
        self._tuple([self.pop(), second, third])

    def op_FROZENSET(self, arg: object) -> None:
        items = self.values(self.pop_mark())
        self.push(self.finished(self._hashed(frozenset, items), items))

    def _hashed(self, kind: Callable[[list[object]], object], items: list[object]) -> object:
        try:
            return kind(items)
        except TypeError as error:  # an unhashable item
            raise _Refused(f"a set holds an unhashable item ({_short(error)})") from None

    def _set_items(self, target: dict[object, object], items: list[object]) -> None:
        try:
            for position in range(0, len(items), 2):
                target[items[position]] = items[position + 1]
        except TypeError as error:
            raise _Refused(f"a dict key is unhashable ({_short(error)})") from None

    def _target(self, kinds: tuple[type, ...], opcode: str) -> object:
        target = self.top()
        if not isinstance(target, kinds):
            raise _Malformed(f"{opcode} on a {type(target).__name__}")
        return target

    def op_APPEND(self, arg: object) -> None:
        item = self.value(self.pop())
        target = self._target((list,), "APPEND")
        self.grow(target, [item])
        target.append(item)  # type: ignore[attr-defined]

    def op_APPENDS(self, arg: object) -> None:
        items = self.values(self.pop_mark())
        target = self._target((list,), "APPENDS")
        self.grow(target, items)
        target.extend(items)  # type: ignore[attr-defined]

    def op_SETITEM(self, arg: object) -> None:
        value = self.value(self.pop())
        key = self.value(self.pop())
        target = self._target((dict,), "SETITEM")
        self.grow(target, [key, value])
        self._set_items(target, [key, value])  # type: ignore[arg-type]

    def op_SETITEMS(self, arg: object) -> None:
        items = self.values(self.pop_mark())
        if len(items) % 2:
            raise _Malformed("SETITEMS with an odd number of items")
        target = self._target((dict,), "SETITEMS")
        self.grow(target, items)
        self._set_items(target, items)  # type: ignore[arg-type]

    def op_ADDITEMS(self, arg: object) -> None:
        items = self.values(self.pop_mark())
        target = self._target((set,), "ADDITEMS")
        self.grow(target, items)
        try:
            target.update(items)  # type: ignore[attr-defined]
        except TypeError as error:
            raise _Refused(f"a set holds an unhashable item ({_short(error)})") from None

    # The memo: sharing finished immutable values is how pickle writes them (a dtype, a string
    # used twice); sharing a mutable container is never needed and is how cycles are built.
    def _memoize(self, index: int) -> None:
        if index not in self.memo and len(self.memo) >= self.limits.max_memo:
            raise _Refused(f"its memo holds more than {self.limits.max_memo} entries")
        self.memo[index] = self.top()

    def op_PUT(self, arg: object) -> None:
        self._memoize(arg)  # type: ignore[arg-type]

    op_BINPUT = op_LONG_BINPUT = op_PUT

    def op_MEMOIZE(self, arg: object) -> None:
        self._memoize(len(self.memo))

    def op_GET(self, arg: object) -> None:
        if arg not in self.memo:
            raise _Malformed(f"memo entry {arg!r} is read before it is written")
        shared = self.memo[arg]  # type: ignore[index]
        if isinstance(shared, _MUTABLE_CONTAINERS):
            raise _Refused(
                f"a {type(shared).__name__} is referenced twice (shared or self-referencing "
                "containers are not allowed)"
            )
        self.push(shared)

    op_BINGET = op_LONG_BINGET = op_GET

    def op_GLOBAL(self, arg: object) -> None:
        module, _, name = str(arg).partition(" ")
        self.push_leaf(_admitted_global(module, name))

    def op_STACK_GLOBAL(self, arg: object) -> None:
        name = self.pop()
        module = self.pop()
        if not isinstance(module, str) or not isinstance(name, str):
            raise _Malformed("STACK_GLOBAL needs two strings")
        self.push_leaf(_admitted_global(module, name))

    # Calls: each admitted global has its one pattern, interpreted here.
    def op_REDUCE(self, arg: object) -> None:
        args = self.pop()
        function = self.pop()
        if not isinstance(function, _Global):
            raise _Malformed(f"REDUCE calls a {type(function).__name__}")
        if not isinstance(args, tuple):
            raise _Malformed(f"REDUCE with arguments of type {type(args).__name__}")
        self.count()
        self.push(self.call(function.name, args))

    def call(self, name: str, args: tuple[object, ...]) -> object:
        if name == "numpy._reconstruct":
            return _reconstruct(args)
        if name == "numpy.dtype":
            return _PendingDtype(_dtype_from_args(args))
        if name == "numpy.scalar":
            return _scalar(args)
        if name == "numpy._frombuffer":
            return self.account(_frombuffer(args, self.limits))
        if name == "_codecs.encode":
            return _latin1_encode(args)
        if name == "builtins.bytes":
            if args:
                # bytes(n) would let a file allocate any amount of memory.
                raise _Refused("bytes() with arguments is not allowed")
            return b""
        if name == "builtins.bytearray":
            if args == ():
                return self.new_container(bytearray())
            if len(args) == 1 and isinstance(args[0], bytes):
                return self.new_container(bytearray(args[0]))
            raise _Refused("bytearray() is only rebuilt from bytes")
        if name in ("builtins.set", "builtins.frozenset"):
            items = _one_sequence(args, name)
            kind = set if name == "builtins.set" else frozenset
            return self.finished(self._hashed(kind, items), items)
        if name == "builtins.complex":
            if len(args) == 2 and all(
                isinstance(part, int | float) and not isinstance(part, bool) for part in args
            ):
                return complex(*args)  # type: ignore[arg-type]
            raise _Refused("complex() is only rebuilt from two numbers")
        if name == "collections.OrderedDict":
            if args == ():
                return self.new_container(collections.OrderedDict())
            raise _Refused("OrderedDict() is only rebuilt empty, then filled")
        raise _Refused(f"{name} is not called by feature pickles")

    def account(self, array: np.ndarray) -> np.ndarray:
        weight = 64 + array.nbytes
        if weight > self.max_weight:
            raise _Refused(f"an array of {array.nbytes} bytes is larger than the file allows")
        return array

    def op_BUILD(self, arg: object) -> None:
        state = self.value(self.pop(), "a BUILD state")
        target = self.top()
        if isinstance(target, _PendingArray) and target.value is None:
            target.value = self.account(_array_from_state(state, self.limits))
            # A new object in the size table: shared references to it are counted.
            self.sizes[id(target.value)] = (target.value, 64 + target.value.nbytes, 1)
        elif isinstance(target, _PendingDtype) and not target.built:
            target.dtype = _dtype_with_state(target.dtype, state)
            target.built = True
        else:
            raise _Refused(
                f"BUILD on a {type(target).__name__}: only numpy arrays and dtypes are rebuilt "
                "with a state"
            )


# --------------------------------------------------------------------------------------------
# numpy's patterns, interpreted


def _one_sequence(args: tuple[object, ...], name: str) -> list[object]:
    if args == ():
        return []
    if len(args) == 1 and isinstance(args[0], list | tuple):
        return list(args[0])
    raise _Refused(f"{name}() is only rebuilt from one list")


def _latin1_encode(args: tuple[object, ...]) -> bytes:
    # Protocols 0-2 written by Python 3 store bytes as ``_codecs.encode(text, "latin1")``. No
    # other codec is needed, so the codec registry (and what it would import) stays out of reach.
    if len(args) == 2 and isinstance(args[0], str) and isinstance(args[1], str):
        if args[1].lower().replace("-", "").replace("_", "") in ("latin1", "iso88591"):
            try:
                return args[0].encode("latin1")
            except UnicodeEncodeError:
                raise _Refused("_codecs.encode of text that is not latin1") from None
        raise _Refused(f"_codecs.encode with encoding {_short(repr(args[1]))} is not allowed")
    raise _Refused("_codecs.encode is only called with (text, 'latin1')")


def _as_bytes(data: object, what: str) -> bytes:
    if isinstance(data, bytes | bytearray):
        return bytes(data)
    if isinstance(data, str):  # Python 2 stored raw buffers as str, read back as latin1
        try:
            return data.encode("latin1")
        except UnicodeEncodeError:
            raise _Refused(f"{what} is text that is not latin1") from None
    raise _Refused(f"{what} is a {type(data).__name__}, expected bytes")


def _dtype_from_args(args: tuple[object, ...]) -> np.dtype:
    """``numpy.dtype(code, False, True)`` for a code on the allow-list (native byte order)."""
    if len(args) != 3 or not isinstance(args[0], str) or args[1:] not in ((False, True), (0, 1)):
        raise _Refused(
            f"numpy.dtype called with {_short(repr(args))}; only (code, False, True) is allowed"
        )
    code = args[0]
    if not _DTYPE_CODE.fullmatch(code):
        raise _Refused(
            f"dtype {_short(repr(code))} is not allowed (only booleans, integers, floats, "
            "complex numbers, fixed-width strings and object arrays of plain values)"
        )
    if code[0] in "US" and int(code[1:]) > DEFAULT_LIMITS.max_string_itemsize:
        raise _Refused(f"string dtype {code} is wider than {DEFAULT_LIMITS.max_string_itemsize}")
    if code[0] == "O":
        return np.dtype(object)
    # The code matched the allow-list above: numpy parses a known, fixed string.
    return np.dtype(code)


def _dtype_with_state(dtype: np.dtype, state: object) -> np.dtype:
    """``dtype`` in the byte order ``state`` names, if ``state`` is the one numpy writes.

    The state is compared with the one numpy itself writes for this dtype, never applied:
    ``dtype.__setstate__`` trusts it (a forged one crashed the interpreter, or made numpy take
    float bytes for object pointers).
    """
    expected = dtype.__reduce__()[2]
    if not isinstance(state, tuple) or len(state) != len(expected):
        raise _Refused(f"malformed state for dtype {dtype}: {_short(repr(state))}")
    order, expected_order = state[1], expected[1]
    orders = ("|",) if expected_order == "|" else ("<", ">", "=")
    if order not in orders or state[:1] + state[2:] != expected[:1] + expected[2:]:
        raise _Refused(
            f"state {_short(repr(state))} for dtype {dtype} is not the one numpy writes "
            f"({expected!r}); structured and other unusual dtypes are not allowed"
        )
    return dtype if order in ("|", "=") else dtype.newbyteorder(order)  # type: ignore[arg-type]


def _checked_dtype(dtype: object, what: str) -> np.dtype:
    if not isinstance(dtype, np.dtype):
        raise _Refused(f"{what} has a dtype of type {type(dtype).__name__}")
    return dtype


def _checked_shape(shape: object, limits: PickleLimits) -> tuple[int, ...]:
    if not isinstance(shape, tuple | list) or len(shape) > limits.max_ndim:
        raise _Refused(f"an array's shape must be a tuple of at most {limits.max_ndim} sizes")
    sides = []
    for side in shape:
        if not isinstance(side, int) or isinstance(side, bool) or not 0 <= side < 2**40:
            raise _Refused(f"an array's shape holds {_short(repr(side))}, not a size")
        sides.append(side)
    return tuple(sides)


def _array_from_bytes(
    shape: tuple[int, ...], dtype: np.dtype, data: bytes, fortran: bool
) -> np.ndarray:
    if dtype.hasobject or dtype.fields is not None or dtype.itemsize == 0:
        raise _Refused(f"an array of dtype {dtype} cannot be rebuilt from bytes")
    count = math.prod(shape)
    if count * dtype.itemsize != len(data):
        raise _Refused(
            f"an array of shape {shape} and dtype {dtype} needs {count * dtype.itemsize} bytes, "
            f"the file gives {len(data)}"
        )
    flat = np.frombuffer(data, dtype=dtype)
    return flat.reshape(shape, order="F" if fortran else "C").copy()


_OBJECT_ITEM_TYPES = (type(None), bool, int, float, complex, str, bytes)


def _object_array(shape: tuple[int, ...], items: object, fortran: bool) -> np.ndarray:
    """An object array put together item by item from a list of plain leaves.

    numpy's own ``__setstate__`` trusts the list's length (a short one made it read past the
    end); here every item is checked and copied in by us.
    """
    count = math.prod(shape)
    if not isinstance(items, list) or len(items) != count:
        given = f"{len(items)} items" if isinstance(items, list) else type(items).__name__
        raise _Refused(
            f"an object array of shape {shape} needs a list of {count} items, got {given}"
        )
    flat = np.empty(count, dtype=object)
    for position, item in enumerate(items):
        if not isinstance(item, _OBJECT_ITEM_TYPES):
            raise _Refused(
                f"an object array holds a {type(item).__name__}; only strings and numbers are "
                "allowed in one"
            )
        flat[position] = item
    return flat.reshape(shape, order="F" if fortran else "C")


def _reconstruct(args: tuple[object, ...]) -> _PendingArray:
    if (
        len(args) != 3
        or not isinstance(args[0], _Global)
        or args[0].name != "numpy.ndarray"
        or args[1] != (0,)
        or args[2] not in (b"b", "b")
    ):
        raise _Refused("numpy._reconstruct is only called as numpy pickles an array")
    return _PendingArray()


def _array_from_state(state: object, limits: PickleLimits) -> np.ndarray:
    # (version, shape, dtype, is_fortran, data), or without the version in old pickles.
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        raise _Refused(f"malformed array state: {type(state).__name__} of the wrong length")
    if len(state) == 5 and state[0] != 1:
        raise _Refused(f"array state version {_short(repr(state[0]))} is not 1")
    shape = _checked_shape(state[-4], limits)
    dtype = _checked_dtype(state[-3], "an array")
    fortran = state[-2]
    if fortran not in (True, False) or not isinstance(fortran, bool | int):
        raise _Refused("an array's is_fortran flag is not a boolean")
    if dtype == np.dtype(object):
        return _object_array(shape, state[-1], bool(fortran))
    return _array_from_bytes(shape, dtype, _as_bytes(state[-1], "an array's data"), bool(fortran))


def _frombuffer(args: tuple[object, ...], limits: PickleLimits) -> np.ndarray:
    # Protocol 5 pickles a contiguous array as _frombuffer(buffer, dtype, shape, order).
    if len(args) != 4 or args[3] not in ("C", "F"):
        raise _Refused("numpy._frombuffer is only called as numpy pickles an array")
    data = _as_bytes(args[0], "an array's buffer")
    dtype = _checked_dtype(args[1], "an array")
    return _array_from_bytes(_checked_shape(args[2], limits), dtype, data, args[3] == "F")


def _scalar(args: tuple[object, ...]) -> np.generic:
    if len(args) != 2:
        raise _Refused("numpy.scalar is only called with (dtype, bytes)")
    dtype = _checked_dtype(args[0], "a numpy scalar")
    if dtype.hasobject or dtype.fields is not None:
        raise _Refused(f"a numpy scalar of dtype {dtype} is not allowed")
    data = _as_bytes(args[1], "a numpy scalar's data")
    if len(data) != dtype.itemsize:
        raise _Refused(f"a {dtype} scalar needs {dtype.itemsize} bytes, the file gives {len(data)}")
    return np.frombuffer(data, dtype=dtype)[0]


# --------------------------------------------------------------------------------------------
# Entry point


def safe_load(path: Path, limits: PickleLimits = DEFAULT_LIMITS) -> object:
    """The content of the pickle at ``path``: plain values, containers and numpy arrays only.

    Raises ``DataError`` naming the file if it cannot be read, is truncated or not a pickle,
    names any global but the few numpy and Python ones feature pickles need, or exceeds a limit.
    Nothing from the file is called, and time and memory stay bounded by the file's size.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"cannot read {path}: no such file")
    try:
        with path.open("rb") as handle:
            size = path.stat().st_size
            interpreter = _Interpreter(size, limits)
            return interpreter.run(pickletools.genops(_BoundedFile(handle, size)))
    except _RefusedGlobal as refused:
        raise DataError(
            f"refusing to load {refused} from {path}: only numpy arrays and plain containers "
            "are allowed; this file is not a feature pickle or may be hostile, do not load it "
            "with plain pickle"
        ) from None
    except _Refused as refused:
        raise DataError(
            f"refusing to load {path}: {refused}; this file is not a feature pickle or may be "
            "hostile, do not load it with plain pickle"
        ) from None
    except OSError as error:
        raise DataError(f"cannot read {path}: {_short(error.strerror or error)}") from None
    except (_Malformed, ValueError, UnicodeError, OverflowError, EOFError) as error:
        kind = "" if isinstance(error, _Malformed) else f"{type(error).__name__}: "
        raise DataError(
            f"{path} is truncated or not a pickle ({kind}{_short(error)}); download the file again"
        ) from None
    except RecursionError:  # pragma: no cover - the reader is not recursive; kept as a net
        raise DataError(f"{path}: nested too deeply to read") from None
    except MemoryError:
        raise DataError(f"{path}: not enough memory to read it") from None
