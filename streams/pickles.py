"""Loaders for the standard published feature pickles (MulT's and MMSA's).

Two layouts are in circulation, both a dict ``{"train", "valid", "test"}`` of dicts of arrays:

* MulT (``mosi_data.pkl``, ``mosei_senti_data.pkl``, ``iemocap_data.pkl``): ``text`` (N, L, 300),
  ``audio`` (N, L, 74), ``vision`` (N, L, 35 or 47), ``labels`` (N, 1, 1) of continuous sentiment
  or, for IEMOCAP, (N, 4, 2): per emotion (neutral, happy, sad, angry) a one-hot
  [not this emotion, this emotion]. Optional ``id``.
* MMSA (``Processed/aligned_50.pkl``, ``unaligned_50.pkl``, ``unaligned_39.pkl``): ``text``
  (N, L, 768), ``audio`` (N, La, Da), ``vision`` (N, Lv, Dv), ``regression_labels`` (N,), plus
  metadata this project does not use (``text_bert``, ``classification_labels``, ``raw_text``,
  ``id``, ``audio_lengths``, ``vision_lengths``, SIMS' per-modality labels).

Both upstream loaders replace ``-inf`` in audio by 0 (COVAREP emits it for silent frames); so do
we, and we report how many. Any other NaN or infinity means a damaged file and is an error:
silently zeroing it would train on garbage.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import numpy as np

from cmmm.data.dataset import MetricFamily, MultimodalDataset, Split, TaskType
from cmmm.errors import ConfigError, DataError, DatasetNotFoundError
from streams.pickle_cache import cached_pickle_dataset, conversion_child
from streams.safe_pickle import safe_load

Log = Callable[[str], object]
PickleFormat = Literal["mult", "mmsa"]

MODALITIES = ("audio", "video", "text")
# Both layouts call the video modality "vision".
FILE_KEY_OF_MODALITY = {"audio": "audio", "video": "vision", "text": "text"}
SPLIT_NAMES = ("train", "valid", "test")
IEMOCAP_CLASS_NAMES = ("neutral", "happy", "sad", "angry")

MULT_SOURCE_HINT = (
    "MulT's aligned feature pickles (mosi_data.pkl, mosei_senti_data.pkl, iemocap_data.pkl) are "
    "linked from the data section of the MulT repository README "
    "(github.com/yaohungt/Multimodal-Transformer)"
)
MMSA_SOURCE_HINT = (
    "MMSA's processed feature pickles (<dataset>/Processed/aligned_50.pkl, unaligned_50.pkl, "
    "unaligned_39.pkl) come with the MMSA dataset release (github.com/thuiar/MMSA)"
)


def load_mult_pickle(path: Path, name: str, log: Log = print) -> MultimodalDataset:
    """Load one of MulT's ``*_data.pkl`` files (MOSI/MOSEI sentiment or IEMOCAP emotions)."""
    path = Path(path)
    return _dataset_from_mult(safe_load(path), path, name, log)


def load_mmsa_pickle(path: Path, name: str, log: Log = print) -> MultimodalDataset:
    """Load one of MMSA's ``Processed/*.pkl`` files.

    The metric family is "sims" when ``name`` mentions SIMS (SIMS scores sign accuracy over all
    samples) and "mosi" otherwise.
    """
    path = Path(path)
    return _dataset_from_mmsa(safe_load(path), path, name, log)


# Candidate file names per stream, in order of preference; the stream name is also the
# sub-directory of the data directory and the dataset name.
STREAM_FILES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "iemocap": ("iemocap", "iemocap", ("iemocap_data.pkl", "iemocap_data_noalign.pkl")),
    "sims": ("sims", "sims", ("unaligned_39.pkl", "aligned_*.pkl", "unaligned_*.pkl")),
    "mosi-pkl": (
        "mosi",
        "mosi",
        ("mosi_data.pkl", "aligned_50.pkl", "unaligned_50.pkl", "mosi_data_noalign.pkl"),
    ),
}


def load_pickle_stream(
    stream: str, data_dir: Path, log: Log = print, cache_dir: Path | None = None
) -> MultimodalDataset:
    """Find the pickle of ``stream`` under ``data_dir``, detect its layout and load it.

    With ``cache_dir``, the file is converted once, in a child process with CPU-time and memory
    limits, into plain ``.npz`` arrays under ``cache_dir`` (``streams.pickle_cache``); later
    calls read only those. Without it, the file is read here.
    """
    if stream not in STREAM_FILES:
        raise ConfigError(
            f"unknown pickle stream {stream!r}; choose one of {', '.join(sorted(STREAM_FILES))}"
        )
    sub_dir, _, patterns = STREAM_FILES[stream]
    directory = Path(data_dir) / sub_dir
    path = _first_match(directory, patterns)
    if path is None:
        searched = ", ".join(str(directory / pattern) for pattern in patterns)
        hint = MMSA_SOURCE_HINT if stream == "sims" else f"{MULT_SOURCE_HINT}; {MMSA_SOURCE_HINT}"
        raise DatasetNotFoundError(
            f"no feature pickle for stream {stream!r}: searched {searched}. {hint}. Place the "
            f"file in {directory}/ (or pass another data directory)."
        )
    if cache_dir is not None:
        return cached_pickle_dataset(path, stream, cache_dir, log)
    return load_pickle_file(path, stream, log)


def load_pickle_file(path: Path, stream: str, log: Log = print) -> MultimodalDataset:
    """Load ``path`` as the pickle of ``stream``, whichever of the two layouts it has."""
    dataset_name = STREAM_FILES[stream][1]
    raw = safe_load(path)
    file_format = detect_pickle_format(raw, path)
    log(f"{stream}: reading {file_format.upper()} pickle {path}")
    if file_format == "mult":
        return _dataset_from_mult(raw, path, dataset_name, log)
    return _dataset_from_mmsa(raw, path, dataset_name, log)


def detect_pickle_format(raw: object, path: Path) -> PickleFormat:
    """Tell MulT's layout (``labels``) from MMSA's (``regression_labels``) by the train keys."""
    splits = _split_dicts(raw, path)
    keys = set(splits["train"])
    if "labels" in keys:
        return "mult"
    if "regression_labels" in keys:
        return "mmsa"
    raise DataError(
        f"{path}: cannot tell the pickle layout: its train split has neither 'labels' (MulT) nor "
        f"'regression_labels' (MMSA); keys found: {sorted(map(str, keys))}. Use MulT's or MMSA's "
        "published files."
    )


def _first_match(directory: Path, patterns: tuple[str, ...]) -> Path | None:
    for pattern in patterns:
        matches = sorted(p for p in directory.glob(pattern) if p.is_file())
        if matches:
            return matches[0]
    return None


def _dataset_from_mult(raw: object, path: Path, name: str, log: Log) -> MultimodalDataset:
    splits = _split_dicts(raw, path)
    label_shape = _array(splits["train"], "labels", path, "train").shape
    is_iemocap = label_shape[1:] == (len(IEMOCAP_CLASS_NAMES), 2)
    built: dict[str, Split] = {}
    notes: dict[str, object] = {"format": "mult", "path": str(path)}
    zeroed: dict[str, int] = {}
    dropped: dict[str, int] = {}
    for split_name in SPLIT_NAMES:
        entry = splits[split_name]
        features, zeroed[split_name] = _features(entry, path, split_name)
        n = _common_length(features, path, split_name)
        raw_labels = _finite_numeric(entry, "labels", path, split_name)
        if raw_labels.shape[0] != n:
            raise DataError(
                f"{path}: {split_name}/labels has {raw_labels.shape[0]} rows but the features "
                f"have {n}; the file is inconsistent, download it again"
            )
        groups = _groups_from_ids(entry.get("id"), n)
        if is_iemocap:
            labels, keep = _iemocap_classes(raw_labels, path, split_name)
            dropped[split_name] = int(n - keep.sum())
            if not keep.any():
                raise DataError(
                    f"{path}: no {split_name} row of 'labels' has exactly one emotion marked; "
                    "expected IEMOCAP one-hot labels of shape (N, 4, 2)"
                )
            if dropped[split_name]:
                features = {m: arr[keep] for m, arr in features.items()}
                groups = None if groups is None else groups[keep]
        else:
            labels = _regression_labels(raw_labels, path, split_name, "labels")
        built[split_name] = Split(features=features, labels=labels, groups=groups)
    _report_zeroed(zeroed, path, log)
    notes["audio_neg_inf_zeroed"] = zeroed
    if is_iemocap:
        task_type: TaskType = "classification"
        metric_family: MetricFamily = "classification"
        num_classes, class_names = len(IEMOCAP_CLASS_NAMES), IEMOCAP_CLASS_NAMES
        notes["iemocap_rows_dropped"] = dropped
        if any(dropped.values()):
            log(
                f"{path}: dropped IEMOCAP rows without exactly one emotion marked: "
                + ", ".join(f"{s} {c}" for s, c in dropped.items())
            )
    else:
        task_type, metric_family = "regression", "mosi"
        num_classes, class_names = 1, ()
    return _finish(
        name, path, built, task_type, metric_family, num_classes, class_names, notes, log
    )


def _dataset_from_mmsa(raw: object, path: Path, name: str, log: Log) -> MultimodalDataset:
    splits = _split_dicts(raw, path)
    built: dict[str, Split] = {}
    zeroed: dict[str, int] = {}
    for split_name in SPLIT_NAMES:
        entry = splits[split_name]
        features, zeroed[split_name] = _features(entry, path, split_name)
        n = _common_length(features, path, split_name)
        raw_labels = _finite_numeric(entry, "regression_labels", path, split_name)
        labels = _regression_labels(raw_labels, path, split_name, "regression_labels")
        if labels.shape[0] != n:
            raise DataError(
                f"{path}: {split_name}/regression_labels has {labels.shape[0]} rows but the "
                f"features have {n}; the file is inconsistent, download it again"
            )
        built[split_name] = Split(
            features=features, labels=labels, groups=_groups_from_ids(entry.get("id"), n)
        )
    _report_zeroed(zeroed, path, log)
    metric_family: MetricFamily = "sims" if "sims" in name.lower() else "mosi"
    notes: dict[str, object] = {
        "format": "mmsa",
        "path": str(path),
        "audio_neg_inf_zeroed": zeroed,
        # MMSA's unaligned files pad every sequence to a fixed length; the true lengths are kept
        # in audio_lengths/vision_lengths, which the padded arrays make unnecessary here.
        "aligned": len({built["train"].features[m].shape[1] for m in MODALITIES}) == 1,
    }
    return _finish(name, path, built, "regression", metric_family, 1, (), notes, log)


def _finish(
    name: str,
    path: Path,
    splits: dict[str, Split],
    task_type: TaskType,
    metric_family: MetricFamily,
    num_classes: int,
    class_names: tuple[str, ...],
    notes: dict[str, object],
    log: Log,
) -> MultimodalDataset:
    _check_same_shape_across_splits(splits, path)
    dataset = MultimodalDataset(
        name=name,
        modalities=MODALITIES,
        task_type=task_type,
        metric_family=metric_family,
        train=splits["train"],
        valid=splits["valid"],
        test=splits["test"],
        num_classes=num_classes,
        class_names=class_names,
        source=f"{notes['format']} pickle {path}",
        notes=notes,
    )
    try:
        dataset.validate()
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from exc
    shapes = ", ".join(
        f"{m} (L={dataset.seq_len(m)}, D={dataset.feature_dim(m)})" for m in MODALITIES
    )
    log(
        f"{name}: loaded {path.name}: train {len(dataset.train)}, valid {len(dataset.valid)}, "
        f"test {len(dataset.test)} samples; {shapes}"
    )
    return dataset


def _split_dicts(raw: object, path: Path) -> dict[str, Mapping[str, object]]:
    if not isinstance(raw, Mapping):
        raise DataError(
            f"{path}: expected a dict with keys {list(SPLIT_NAMES)}, got {type(raw).__name__}; "
            "this is not a MulT or MMSA feature pickle"
        )
    found = sorted(map(str, raw))
    splits: dict[str, Mapping[str, object]] = {}
    for split_name in SPLIT_NAMES:
        if split_name not in raw:
            raise DataError(
                f"{path}: missing split {split_name!r}; keys found: {found}. Expected a MulT or "
                "MMSA feature pickle with train/valid/test"
            )
        entry = raw[split_name]
        if not isinstance(entry, Mapping):
            raise DataError(
                f"{path}: split {split_name!r} is a {type(entry).__name__}, expected a dict of "
                "arrays"
            )
        splits[split_name] = entry
    return splits


def _array(entry: Mapping[str, object], key: str, path: Path, split_name: str) -> np.ndarray:
    if key not in entry:
        raise DataError(
            f"{path}: split {split_name!r} has no key {key!r}; keys found: "
            f"{sorted(map(str, entry))}"
        )
    value = entry[key]
    if isinstance(value, np.ndarray):
        arr = value
    else:
        try:
            arr = np.asarray(value)
        except ValueError as exc:  # ragged nested lists
            raise DataError(f"{path}: {split_name}/{key} is not a rectangular array") from exc
    if arr.dtype.kind not in "biuf" or arr.ndim == 0:
        raise DataError(
            f"{path}: {split_name}/{key} must be a numeric array, got dtype {arr.dtype} with "
            f"shape {arr.shape}"
        )
    return arr


def _finite_numeric(
    entry: Mapping[str, object], key: str, path: Path, split_name: str
) -> np.ndarray:
    arr = _array(entry, key, path, split_name)
    if arr.dtype.kind == "f":
        _raise_if_not_finite(arr, path, split_name, key)
    return arr


def _raise_if_not_finite(arr: np.ndarray, path: Path, split_name: str, key: str) -> None:
    finite = np.isfinite(arr)
    if finite.all():
        return
    n_nan = int(np.isnan(arr).sum())
    n_inf = int(arr.size - finite.sum()) - n_nan
    raise DataError(
        f"{path}: {split_name}/{key} holds {n_nan} NaN and {n_inf} infinite values (only -inf in "
        "audio is tolerated, and replaced by 0); the file is damaged: download it again or fix "
        "those entries"
    )


def _as_float32(arr: np.ndarray, path: Path, split_name: str, key: str) -> np.ndarray:
    """``arr`` as float32, refusing finite values that float32 cannot hold (they would turn
    into infinities the model cannot train on)."""
    with np.errstate(over="ignore"):
        narrowed = arr.astype(np.float32, copy=False)
    overflowed = np.isinf(narrowed) & np.isfinite(arr)
    if overflowed.any():
        biggest = float(np.abs(arr[overflowed]).max())
        raise DataError(
            f"{path}: {split_name}/{key} holds {int(overflowed.sum())} values beyond the float32 "
            f"range (largest magnitude {biggest:.3g}); the file is damaged: download it again or "
            "fix those entries"
        )
    return narrowed


def _features(
    entry: Mapping[str, object], path: Path, split_name: str
) -> tuple[dict[str, np.ndarray], int]:
    """Per-modality float32 (N, L, D) arrays and the number of audio -inf entries set to 0."""
    features: dict[str, np.ndarray] = {}
    zeroed = 0
    for modality in MODALITIES:
        key = FILE_KEY_OF_MODALITY[modality]
        arr = _array(entry, key, path, split_name)
        if arr.ndim != 3:
            raise DataError(
                f"{path}: {split_name}/{key} has shape {arr.shape}, expected (N, L, D); "
                "this is not a MulT or MMSA feature pickle"
            )
        arr = _as_float32(arr, path, split_name, key)
        if modality == "audio":
            neg_inf = np.isneginf(arr)
            zeroed = int(neg_inf.sum())
            if zeroed:
                if not arr.flags.writeable:  # arrays rebuilt from an in-band buffer are read-only
                    arr = arr.copy()
                arr[neg_inf] = 0.0
        _raise_if_not_finite(arr, path, split_name, key)
        features[modality] = arr
    return features, zeroed


def _common_length(features: Mapping[str, np.ndarray], path: Path, split_name: str) -> int:
    lengths = {m: arr.shape[0] for m, arr in features.items()}
    if len(set(lengths.values())) != 1:
        rows = ", ".join(f"{FILE_KEY_OF_MODALITY[m]} {n}" for m, n in lengths.items())
        raise DataError(
            f"{path}: the {split_name} modalities have different numbers of samples ({rows}); "
            "the file is inconsistent, download it again"
        )
    return next(iter(lengths.values()))


def _check_same_shape_across_splits(splits: Mapping[str, Split], path: Path) -> None:
    for modality in MODALITIES:
        reference = splits["train"].features[modality].shape[1:]
        for split_name in SPLIT_NAMES[1:]:
            shape = splits[split_name].features[modality].shape[1:]
            if shape != reference:
                key = FILE_KEY_OF_MODALITY[modality]
                raise DataError(
                    f"{path}: {split_name}/{key} has (L, D) = {shape} but train has {reference}; "
                    "all splits of one file must share sequence length and width"
                )


def _regression_labels(raw: np.ndarray, path: Path, split_name: str, key: str) -> np.ndarray:
    # MulT stores (N, 1, 1), MMSA (N,) or (N, 1): one score per sample either way.
    if raw.ndim == 0 or raw.shape[1:] not in ((), (1,), (1, 1)):
        raise DataError(
            f"{path}: {split_name}/{key} has shape {raw.shape}, expected one sentiment score per "
            "sample: (N,), (N, 1) or (N, 1, 1)"
        )
    return _as_float32(raw.reshape(raw.shape[0]), path, split_name, key)


def _iemocap_classes(raw: np.ndarray, path: Path, split_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Class index per row and the mask of rows with exactly one emotion marked.

    MulT itself treats IEMOCAP as four binary tasks (argmax over the last axis, one loss per
    emotion). This project needs one class per sample, so a row counts only if exactly one
    emotion k has ``[k, 1] == 1``; rows with none or several are dropped by the caller.
    """
    expected = (len(IEMOCAP_CLASS_NAMES), 2)
    if raw.ndim != 3 or raw.shape[1:] != expected:
        raise DataError(
            f"{path}: {split_name}/labels has shape {raw.shape}, expected IEMOCAP one-hot labels "
            f"(N, {expected[0]}, {expected[1]})"
        )
    positive = raw[:, :, 1] == 1
    keep = positive.sum(axis=1) == 1
    classes = np.argmax(positive[keep], axis=1).astype(np.int64)
    return classes, keep


def _groups_from_ids(ids: object, n: int) -> np.ndarray | None:
    """The video each sample comes from, when the file's ``id`` says so; else None.

    MulT's ids are rows (video, start, end); MMSA's are "video$_$clip" strings. Ids are optional
    metadata, so anything unexpected yields None rather than an error.
    """
    if ids is None:
        return None
    try:
        arr = np.asarray(ids, dtype=object)
    except ValueError:
        return None
    if arr.ndim == 0 or arr.shape[0] != n or n == 0:
        return None
    if arr.ndim == 2 and arr.shape[1] >= 1:
        first = arr[:, 0]
    elif arr.ndim == 1:
        first = arr
    else:
        return None
    groups = []
    for value in first:
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        groups.append(text.split("$_$")[0])
    return np.asarray(groups, dtype=str)


def _report_zeroed(zeroed: Mapping[str, int], path: Path, log: Log) -> None:
    if any(zeroed.values()):
        log(
            f"{path}: replaced -inf by 0 in audio (as MulT and MMSA do): "
            + ", ".join(f"{split} {count}" for split, count in zeroed.items())
        )


if __name__ == "__main__":  # the sandboxed conversion child of streams.pickle_cache
    sys.exit(conversion_child(sys.argv[1:], load_pickle_file))
