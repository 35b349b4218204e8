"""Small files in the exact layouts of the published feature pickles, for tests.

``mult_content``/``mmsa_content`` build the dict a real file holds (so a test can damage it
before writing); ``write_pickle`` writes any such dict with plain ``pickle.dump``, as the
upstream projects did. ``python2_array_pickle_bytes`` hand-assembles what Python 2 wrote for a
numpy array, which Python 3 cannot produce itself.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SPLIT_SIZES = {"train": 24, "valid": 8, "test": 8}
IEMOCAP_EMOTIONS = 4


def iemocap_onehot(classes: Sequence[int]) -> np.ndarray:
    """MulT's IEMOCAP labels (N, 4, 2): per emotion [1, 0] = not it, [0, 1] = it."""
    labels = np.zeros((len(classes), IEMOCAP_EMOTIONS, 2), dtype=np.float32)
    labels[:, :, 0] = 1.0
    for row, cls in enumerate(classes):
        labels[row, cls] = (0.0, 1.0)
    return labels


def mult_content(
    kind: str = "mosi",
    *,
    sizes: dict[str, int] | None = None,
    seq_len: int = 6,
    widths: dict[str, int] | None = None,
    audio_neg_inf: int = 0,
    with_ids: bool = True,
    seed: int = 0,
) -> dict[str, dict[str, np.ndarray]]:
    """MulT's layout: kind "mosi" (labels (N, 1, 1)) or "iemocap" (labels (N, 4, 2)).

    ``audio_neg_inf`` entries of each split's audio are set to -inf (at distinct positions).
    """
    rng = np.random.default_rng(seed)
    sizes = sizes or SPLIT_SIZES
    widths = widths or {"text": 7, "audio": 5, "vision": 4}
    content: dict[str, dict[str, np.ndarray]] = {}
    for split, n in sizes.items():
        entry = {
            key: rng.normal(size=(n, seq_len, width)).astype(np.float32)
            for key, width in widths.items()
        }
        _put_neg_inf(entry["audio"], audio_neg_inf)
        if kind == "iemocap":
            entry["labels"] = iemocap_onehot(rng.integers(0, IEMOCAP_EMOTIONS, size=n).tolist())
        elif kind == "mosi":
            entry["labels"] = rng.uniform(-3, 3, size=(n, 1, 1)).astype(np.float32)
        else:
            raise ValueError(f"unknown kind {kind!r}")
        if with_ids:
            # MulT's ids: one row (video, start, end) per sample, as byte strings.
            entry["id"] = np.array(
                [[f"vid{i // 3}".encode(), b"0", b"1"] for i in range(n)], dtype=object
            )
        content[split] = entry
    return content


def mmsa_content(
    *,
    sizes: dict[str, int] | None = None,
    lengths: dict[str, int] | None = None,
    widths: dict[str, int] | None = None,
    audio_neg_inf: int = 0,
    label_range: float = 3.0,
    with_metadata: bool = True,
    seed: int = 0,
) -> dict[str, dict[str, object]]:
    """MMSA's layout; unequal ``lengths`` give an unaligned file like ``unaligned_50.pkl``."""
    rng = np.random.default_rng(seed)
    sizes = sizes or SPLIT_SIZES
    lengths = lengths or {"text": 6, "audio": 8, "vision": 5}
    widths = widths or {"text": 9, "audio": 5, "vision": 4}
    content: dict[str, dict[str, object]] = {}
    for split, n in sizes.items():
        entry: dict[str, object] = {
            key: rng.normal(size=(n, lengths[key], widths[key])).astype(np.float32)
            for key in ("text", "audio", "vision")
        }
        _put_neg_inf(entry["audio"], audio_neg_inf)  # type: ignore[arg-type]
        regression = rng.uniform(-label_range, label_range, size=n).astype(np.float32)
        entry["regression_labels"] = regression
        if with_metadata:
            # BERT token ids/mask/segments, (N, 3, L): present in MMSA files, not used by us.
            entry["text_bert"] = rng.integers(0, 100, size=(n, 3, lengths["text"])).astype(
                np.float32
            )
            entry["classification_labels"] = (regression > 0).astype(np.float32)
            entry["raw_text"] = np.array([f"utterance number {i}" for i in range(n)], dtype=object)
            entry["id"] = np.array([f"video{i // 4}$_${i % 4}" for i in range(n)], dtype=object)
            entry["audio_lengths"] = [int(x) for x in rng.integers(1, lengths["audio"] + 1, n)]
            entry["vision_lengths"] = [int(x) for x in rng.integers(1, lengths["vision"] + 1, n)]
        content[split] = entry
    return content


def write_pickle(path: Path, content: object, protocol: int = pickle.DEFAULT_PROTOCOL) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as stream:
        pickle.dump(content, stream, protocol=protocol)
    return path


def write_mult_pickle(path: Path, kind: str = "mosi", **options: object) -> Path:
    return write_pickle(path, mult_content(kind, **options))  # type: ignore[arg-type]


def write_mmsa_pickle(path: Path, **options: object) -> Path:
    return write_pickle(path, mmsa_content(**options))  # type: ignore[arg-type]


def _put_neg_inf(audio: np.ndarray, count: int) -> None:
    flat = audio.reshape(-1)
    if count > flat.size:
        raise ValueError(f"cannot place {count} -inf in an array of {flat.size} entries")
    flat[np.linspace(0, flat.size - 1, num=count).astype(int)] = -np.inf


def python2_array_pickle_bytes(key: str, array: np.ndarray) -> bytes:
    """A protocol-2 pickle of ``{key: array}`` as Python 2 + numpy 1.x wrote it.

    Python 2 stores the raw buffer as a byte *string* (BINSTRING), which Python 3 must decode
    with latin1; it also names ``numpy.core.multiarray``, which numpy 2 renamed.
    """
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder not in ("<", "="):
        raise ValueError("only little-endian arrays are supported")

    def short_string(text: str) -> bytes:
        raw = text.encode("ascii")
        return b"U" + bytes([len(raw)]) + raw

    def small_int(value: int) -> bytes:
        return b"K" + bytes([value])

    def int4(value: int) -> bytes:
        return b"J" + struct.pack("<i", value)

    shape = b"(" + b"".join(int4(d) for d in array.shape) + b"t"
    dtype = (
        b"cnumpy\ndtype\n"
        + short_string(array.dtype.str[1:])
        + small_int(0)
        + small_int(1)
        + b"\x87R"  # TUPLE3, REDUCE
        + b"("  # dtype state: version, byte order, subarray, names, fields, itemsize, align, flags
        + small_int(3)
        + short_string("<")
        + b"NNN"
        + int4(-1)
        + int4(-1)
        + small_int(0)
        + b"tb"  # TUPLE, BUILD
    )
    data = array.tobytes()
    arr = (
        b"cnumpy.core.multiarray\n_reconstruct\n"
        + b"cnumpy\nndarray\n"
        + small_int(0)
        + b"\x85"  # TUPLE1
        + short_string("b")
        + b"\x87R"
        + b"("  # array state: version, shape, dtype, is_fortran, raw data
        + small_int(1)
        + shape
        + dtype
        + b"\x89"  # NEWFALSE
        + b"T"
        + struct.pack("<I", len(data))
        + data
        + b"tb"
    )
    return b"\x80\x02}" + short_string(key) + arr + b"s."
