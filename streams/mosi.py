"""The real CMU-MOSI stream: bc-LSTM utterance features joined with the SDK's continuous labels.

Layout expected under ``<data_dir>/mosi/`` (what ``cmmm data download mosi`` produces):

- ``bc-LSTM/data/{audio,video,text}/<modality>_{train,test}0.csv``: one utterance vector per
  row, the last column the bc-LSTM binary label;
- ``bc-LSTM/data/text_{train,test}.csv``: column 0 is the row index into ``transcripts.csv``,
  which names the utterance (``<video>_<k>``) behind each row;
- ``labels/CMU_MOSI_Opinion_Labels.csd``: HDF5 from the CMU Multimodal SDK with the continuous
  sentiment of every segment.

Joining the two: utterance ``<video>_<k>`` is the k-th row (1-based) of
``Opinion Segment Labels/data/<video>`` *in the order the file stores them*. Sorting the segments
by interval start instead, as one might expect, reorders two videos (``VbQk4H8hgr0``,
``d6hH302o4v8``) whose stored order is not chronological; the transcripts show the stored order
is the right one (for example ``VbQk4H8hgr0_33`` "A FEW MOMENTS ... ORIGINAL AND FUNNY" gets +0.4
in stored order, -2.8 in time order), and with it the sign agrees with the binary label
(``label >= 0`` is positive) for all 2199 utterances, against 2193 in time order.

Text: by default the published 100-d utterance vectors (``text="utterance"``). With
``text=<name>`` the text modality is instead the token sequence that
``cmmm data encode-text mosi`` cached for each transcript (``streams.text_encoding``), joined by
utterance id; the audio, video, labels and splits are the same either way.

The split is the bc-LSTM train/test one (speaker independent: the text and video extractors were
trained on its train rows). Validation is a handful of whole train videos picked by a seeded
generator. The CMU standard folds must never be used with these features (test leakage).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cmmm.atomic_files import atomic_write
from cmmm.data.dataset import MultimodalDataset, Split
from cmmm.errors import ConfigError, DataError, DatasetNotFoundError, one_line
from streams.text_encoding import (
    UTTERANCE_TEXT,
    Progress,
    TextEncoding,
    encode_transcripts,
    load_encoding,
)

Log = Callable[[str], None]

MOSI_DIRNAME = "mosi"
MODALITIES: tuple[str, ...] = ("audio", "video", "text")
SPLITS: tuple[str, ...] = ("train", "valid", "test")
# The bc-LSTM files only have these two; "valid" is carved out of "train".
SOURCE_SPLITS: tuple[str, ...] = ("train", "test")
FEATURE_DIMS: dict[str, int] = {"audio": 73, "video": 100, "text": 100}
LABEL_RANGE = (-3.0, 3.0)

_BCLSTM_COMMIT = "111b401d867c14a1dcd930fd2b2ab58a5eca3f70"
_BCLSTM_BASE = (
    f"https://raw.githubusercontent.com/declare-lab/multimodal-deep-learning/{_BCLSTM_COMMIT}/"
)
_LABELS_URL = (
    "https://raw.githubusercontent.com/worldreboot/audio-text-sentiment-analysis/"
    "40df4d8e7ed1b120e2a36286d96b3b6968e00b13/cmumosi/CMU_MOSI_Opinion_Labels.csd"
)


class MosiFile(NamedTuple):
    """One published file: where it lives under ``<data_dir>/mosi``, where to fetch it, checksum."""

    path: str
    url: str
    sha256: str
    size: int


def _bclstm(path: str, sha256: str, size: int) -> MosiFile:
    # Same relative path locally and in the repository (``bc-LSTM/data/...``).
    return MosiFile(f"bc-LSTM/{path}", f"{_BCLSTM_BASE}bc-LSTM/{path}", sha256, size)


# Checksums and sizes from SOURCES.md. The LICENSE has none there; its checksum is that of the
# byte-identical copy in the shared data directory (MIT, DeCLaRe Lab), kept so the attribution
# travels with the features.
MOSI_FILES: tuple[MosiFile, ...] = (
    _bclstm(
        "data/transcripts.csv",
        "e7689e6d70720addd2a6b316419d245a68839c32b014ff426c406063ee777466",
        201361,
    ),
    _bclstm(
        "data/text_train.csv",
        "73770b6302ad0f7a51f4eddcae6788efde4d0b6802e09f78249d5b538d1c1d67",
        1689050,
    ),
    _bclstm(
        "data/text_test.csv",
        "f3b735070bf07ceff7a6ef6c8f4c32757e988de484e35bd6d38b2aecef851a59",
        889325,
    ),
    _bclstm(
        "data/text/text_train0.csv",
        "cc327045db6cc361a08b4037b97bb24de4ddb5efb381468c4835cc4a60674668",
        2993906,
    ),
    _bclstm(
        "data/text/text_test0.csv",
        "a343e22272919d1384c2075dbcdd5fef5aa9f9366b0552a83f7c3147b64b047a",
        1551145,
    ),
    _bclstm(
        "data/audio/audio_train0.csv",
        "5435398a54664e7b00304587dc59ae84a438852be033c2a2fba779588624a2a1",
        1343911,
    ),
    _bclstm(
        "data/audio/audio_test0.csv",
        "ddd17eeefd3d951d51d4e2ef8a0d132652d8161e1886f71eb7262b7a14bffff6",
        699228,
    ),
    _bclstm(
        "data/video/video_train0.csv",
        "b6efc0413132d627efd06f67f1706830e775e90af9a75696f535c48dbc73f12f",
        1055454,
    ),
    _bclstm(
        "data/video/video_test0.csv",
        "cab836253d81100f59d533fa2ff65cd53c486be3ec9fd82203c5e25a7a77265f",
        557378,
    ),
    MosiFile(
        "bc-LSTM/LICENSE",
        _BCLSTM_BASE + "LICENSE",
        "7a4348bcc838ef3811ad96475d975869ba6104bfec46572b371fa34482defdb5",
        1107,
    ),
    MosiFile(
        "labels/CMU_MOSI_Opinion_Labels.csd",
        _LABELS_URL,
        "aef5f4617cdb067cc7606bb798eb6452c3de45f0f21cb3427be33c4d8c7fe852",
        674712,
    ),
)

TRANSCRIPTS = "bc-LSTM/data/transcripts.csv"
LABELS_CSD = "labels/CMU_MOSI_Opinion_Labels.csd"
CSD_DATA_GROUP = "Opinion Segment Labels/data"


def index_file(split: str) -> str:
    return f"bc-LSTM/data/text_{split}.csv"


def modality_file(modality: str, split: str) -> str:
    return f"bc-LSTM/data/{modality}/{modality}_{split}0.csv"


# Every file the loader reads (the LICENSE is fetched but not needed to build the dataset).
LOADER_FILES: tuple[str, ...] = (
    TRANSCRIPTS,
    *(index_file(s) for s in SOURCE_SPLITS),
    *(modality_file(m, s) for m in MODALITIES for s in SOURCE_SPLITS),
    LABELS_CSD,
)

_PUBLISHED = {f.path: f for f in MOSI_FILES}
# Bump when the cached arrays change meaning, so old caches are ignored rather than misread.
CACHE_FORMAT = 2  # 2: arrays_sha256 added
# The cache's own checksum of its arrays: any change to them after writing means a rebuild.
CACHE_DIGEST = "arrays_sha256"
# Below this share of agreeing signs the .csd cannot be the label file of these CSVs.
MIN_SIGN_AGREEMENT = 0.95
# At most six digits for k: MOSI videos have a few dozen segments, and int() refuses numbers
# of more than 4300 digits, which a damaged file could hold.
_UTTERANCE_ID = re.compile(r"^(?P<video>.+)_(?P<k>[1-9][0-9]{0,5})$")


def download_command(data_dir: Path) -> str:
    return f"cmmm data download mosi --data-dir {data_dir}"


def encode_text_command(data_dir: Path, cache_dir: Path, name: str) -> str:
    command = f"cmmm data encode-text mosi --model DIR --name {name} --data-dir {data_dir}"
    # The runner keeps MOSI's cache in <--cache-dir>/mosi, which is where the command writes.
    if cache_dir.name == MOSI_DIRNAME:
        command += f" --cache-dir {cache_dir.parent}"
    return command


# --------------------------------------------------------------------------------------------
# Public entry points


def load_mosi(
    data_dir: Path,
    cache_dir: Path | None = None,
    valid_videos: int = 10,
    split_seed: int = 0,
    text: str = UTTERANCE_TEXT,
    log: Log = print,
) -> MultimodalDataset:
    """Load CMU-MOSI from ``<data_dir>/mosi``, building and caching the arrays on first use.

    Features are returned as published; the runner standardises them with train statistics
    (``cmmm.data.standardization``). Label and split statistics are reported through ``log``.
    ``text`` names the text features: ``"utterance"`` or an encoding that
    ``cmmm data encode-text mosi`` cached in ``cache_dir``.
    """
    data_dir = Path(data_dir)
    root = data_dir / MOSI_DIRNAME
    if isinstance(valid_videos, bool) or not isinstance(valid_videos, int) or valid_videos < 1:
        raise ConfigError(
            "CMU-MOSI: valid_videos must be a positive whole number of videos, got "
            f"{valid_videos!r}"
        )
    if not isinstance(text, str) or not text:
        raise ConfigError(
            f"CMU-MOSI: text must be {UTTERANCE_TEXT!r} or the name of a text encoding "
            f"(for example minilm), got {text!r}"
        )
    digests = source_digests(data_dir)
    key = _cache_key(digests, valid_videos, split_seed)
    cache_path = mosi_cache_dir(data_dir, cache_dir)
    cache_file = cache_path / f"mosi-{key[:24]}.npz"

    arrays = _read_cache(cache_file, key, log)
    if arrays is not None:
        try:
            dataset = _to_dataset(arrays, root, valid_videos, split_seed).validate()
        except DataError as err:
            log(f"CMU-MOSI: ignoring unusable cache {cache_file} ({err}); rebuilding it")
            arrays = None
    if arrays is None:
        differing = [p for p, d in digests.items() if d != _PUBLISHED[p].sha256]
        if differing:
            log(
                "CMU-MOSI: these files differ from the published ones (sha256), using them as "
                f"they are: {', '.join(differing)}"
            )
        arrays = _build_arrays(root, valid_videos, split_seed)
        arrays["cache_key"] = np.array(key)
        arrays["cache_format"] = np.array(CACHE_FORMAT)
        arrays[CACHE_DIGEST] = np.array(_arrays_digest(arrays))
        _write_cache(cache_file, arrays, log)
        dataset = _to_dataset(arrays, root, valid_videos, split_seed).validate()
        origin = f"built from {root}"
    else:
        origin = f"loaded from cache {cache_file}"
    for line in describe(dataset, origin):
        log(line)
    if text != UTTERANCE_TEXT:
        encoding = load_encoding(
            cache_path,
            text,
            digests[TRANSCRIPTS],
            encode_command=encode_text_command(data_dir, cache_path, text),
        )
        dataset = with_encoded_text(dataset, encoding).validate()
        for line in encoding.describe():
            log(line)
    return dataset


def mosi_cache_dir(data_dir: Path, cache_dir: Path | None) -> Path:
    """Where the built arrays and text encodings live: ``cache_dir``, else inside the data."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(data_dir) / MOSI_DIRNAME / ".cmmm-cache"


def encode_mosi_transcripts(
    data_dir: Path,
    model_dir: Path,
    cache_dir: Path | None = None,
    name: str | None = None,
    max_tokens: int | None = None,
    replace: bool = False,
    device: str = "auto",
    log: Log = print,
    on_progress: Progress | None = None,
) -> tuple[TextEncoding, bool]:
    """Encode the transcripts of ``<data_dir>/mosi`` with a local encoder, for ``text=<name>``.

    Returns the encoding and whether an identical cached one was reused (see
    ``streams.text_encoding.encode_transcripts``).
    """
    path = Path(data_dir) / MOSI_DIRNAME / TRANSCRIPTS
    if not path.is_file():
        raise DatasetNotFoundError(
            f"CMU-MOSI transcripts not found: {path} does not exist. "
            f"Fetch the data with: {download_command(Path(data_dir))}"
        )
    ids, texts, _ = _read_transcripts(path)
    options = {} if max_tokens is None else {"max_tokens": max_tokens}
    return encode_transcripts(
        ids,
        texts,
        transcripts_sha256=file_sha256(path),
        model_dir=model_dir,
        cache_dir=mosi_cache_dir(data_dir, cache_dir),
        name=name,
        replace=replace,
        device=device,
        log=log,
        on_progress=on_progress,
        **options,
    )


def with_encoded_text(dataset: MultimodalDataset, encoding: TextEncoding) -> MultimodalDataset:
    """``dataset`` with its text replaced by the encoding's token sequences, joined by id."""
    row_of = {utterance: row for row, utterance in enumerate(encoding.utterance_ids.tolist())}
    ids_by_split: Mapping[str, np.ndarray] = dataset.notes["utterance_ids"]  # type: ignore[assignment]
    splits: dict[str, Split] = {}
    for name, split in dataset.splits.items():
        ids = ids_by_split[name].tolist()
        missing = [u for u in ids if u not in row_of]
        if missing:
            raise DataError(
                f"text encoding {encoding.name!r} has no transcript for utterances "
                f"{', '.join(missing[:5])}; encode the transcripts again with: "
                "cmmm data encode-text mosi --model DIR --replace"
            )
        rows = np.array([row_of[u] for u in ids], dtype=np.int64)
        splits[name] = dataclasses.replace(
            split,
            features={**split.features, "text": encoding.tokens[rows].astype(np.float32)},
            lengths={**split.lengths, "text": encoding.lengths[rows].astype(np.int64)},
        )
    return dataclasses.replace(
        dataset,
        train=splits["train"],
        valid=splits["valid"],
        test=splits["test"],
        source=f"{dataset.source}; text: token sequences of encoding {encoding.name!r}",
        notes={
            **dataset.notes,
            "text": {
                "encoding": encoding.name,
                "encoder": encoding.model_dir,
                "max_tokens": encoding.max_tokens,
                "key": encoding.key,
                "truncated": encoding.truncated,
            },
        },
    )


def source_digests(data_dir: Path) -> dict[str, str]:
    """sha256 of every file the loader reads, by path relative to ``<data_dir>/mosi``.

    Raises ``DatasetNotFoundError`` (with the command that fetches the data) if any is missing.
    """
    data_dir = Path(data_dir)
    root = data_dir / MOSI_DIRNAME
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"CMU-MOSI not found: the directory {root} does not exist. "
            f"Fetch the data with: {download_command(data_dir)}"
        )
    missing = [p for p in LOADER_FILES if not (root / p).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"CMU-MOSI in {root} is incomplete: missing {', '.join(missing)}. "
            f"Fetch the data with: {download_command(data_dir)}"
        )
    return {p: file_sha256(root / p) for p in LOADER_FILES}


def mosi_cache_key(data_dir: Path, valid_videos: int = 10, split_seed: int = 0) -> str:
    """The key under which ``load_mosi`` caches this data directory and split."""
    return _cache_key(source_digests(data_dir), valid_videos, split_seed)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def describe(dataset: MultimodalDataset, origin: str) -> list[str]:
    """Human-readable counts and label statistics per split (what ``load_mosi`` logs)."""
    lines = [f"CMU-MOSI {origin}"]
    for name, split in dataset.splits.items():
        labels = split.labels.astype(np.float64)
        videos = len(np.unique(split.groups)) if split.groups is not None else 0
        lines.append(
            f"  {name}: {len(split)} utterances, {videos} videos; labels mean "
            f"{labels.mean():+.3f} std {labels.std():.3f} min {labels.min():+.2f} max "
            f"{labels.max():+.2f}, positive {np.mean(labels > 0):.1%}, "
            f"zero {int(np.sum(labels == 0))}"
        )
    agree, total = dataset.notes["sign_agreement"]  # type: ignore[misc]
    lines.append(
        f"  sign of the continuous label agrees with the bc-LSTM binary label (label >= 0 is "
        f"positive) for {agree}/{total} utterances"
    )
    return lines


# --------------------------------------------------------------------------------------------
# Building


def _build_arrays(root: Path, valid_videos: int, split_seed: int) -> dict[str, np.ndarray]:
    transcript_ids, _, transcript_binary = _read_transcripts(root / TRANSCRIPTS)
    segment_labels = _read_segment_labels(root / LABELS_CSD)

    per_source: dict[str, dict[str, np.ndarray]] = {}
    for split in SOURCE_SPLITS:
        per_source[split] = _read_source_split(
            root, split, transcript_ids, transcript_binary, segment_labels
        )

    train_videos = set(per_source["train"]["groups"].tolist())
    test_videos = set(per_source["test"]["groups"].tolist())
    shared = sorted(train_videos & test_videos)
    if shared:
        raise DataError(
            f"CMU-MOSI in {root}: videos {', '.join(shared[:5])} have utterances (as "
            f"{TRANSCRIPTS} names them) in both {index_file('train')} and {index_file('test')}; "
            "the bc-LSTM split must be speaker independent. "
            "Re-fetch the data with: cmmm data download mosi"
        )
    ids = np.concatenate([per_source[s]["utterance_ids"] for s in SOURCE_SPLITS])
    if len(np.unique(ids)) != len(ids):
        raise DataError(
            f"CMU-MOSI in {root}: {index_file('train')} and {index_file('test')} name the same "
            "utterance more than once. Re-fetch the data with: cmmm data download mosi"
        )

    ordered_train_videos = sorted(train_videos)
    if valid_videos >= len(ordered_train_videos):
        raise ConfigError(
            f"CMU-MOSI: valid_videos={valid_videos} leaves no training video (the train rows "
            f"hold {len(ordered_train_videos)} videos); choose fewer validation videos"
        )
    rng = np.random.default_rng(split_seed)
    chosen = rng.choice(len(ordered_train_videos), size=valid_videos, replace=False)
    held_out = np.array([ordered_train_videos[i] for i in sorted(chosen)])
    in_valid = np.isin(per_source["train"]["groups"], held_out)

    arrays: dict[str, np.ndarray] = {}
    parts = {
        "train": (per_source["train"], ~in_valid),
        "valid": (per_source["train"], in_valid),
        "test": (per_source["test"], np.ones(len(per_source["test"]["labels"]), dtype=bool)),
    }
    for split, (source, mask) in parts.items():
        for name, values in source.items():
            arrays[f"{split}.{name}"] = values[mask]

    agree = sum(
        int(np.sum((per_source[s]["labels"] >= 0) == (per_source[s]["binary"] == 1)))
        for s in SOURCE_SPLITS
    )
    total = len(ids)
    if agree < MIN_SIGN_AGREEMENT * total:
        raise DataError(
            f"CMU-MOSI in {root}: the continuous labels of {LABELS_CSD} agree in sign with the "
            f"bc-LSTM binary labels for only {agree}/{total} utterances (2199/2199 for the "
            "published files); the label file does not belong to these features. "
            "Re-fetch the data with: cmmm data download mosi"
        )
    arrays["sign_agreement"] = np.array([agree, total], dtype=np.int64)
    return arrays


def _read_source_split(
    root: Path,
    split: str,
    transcript_ids: list[str],
    transcript_binary: np.ndarray,
    segment_labels: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Arrays of one bc-LSTM split, rows in file order."""
    index_path = root / index_file(split)
    index_rows = _read_numeric_csv(index_path, 1 + FEATURE_DIMS["text"], binary_last=False)
    n = index_rows.shape[0]
    row_index = index_rows[:, 0]
    invalid = (row_index != np.round(row_index)) | (row_index < 0)
    invalid |= row_index >= len(transcript_ids)
    if invalid.any():
        bad = int(np.flatnonzero(invalid)[0])
        raise DataError(
            f"{index_path}: row {bad + 1}: column 0 must be a row number of {TRANSCRIPTS} "
            f"(0..{len(transcript_ids) - 1}), got {row_index[bad]!r}"
        )
    rows = row_index.astype(np.int64)
    utterance_ids = [transcript_ids[i] for i in rows]
    binary = transcript_binary[rows]

    result: dict[str, np.ndarray] = {}
    for modality in MODALITIES:
        path = root / modality_file(modality, split)
        table = _read_numeric_csv(path, FEATURE_DIMS[modality] + 1)
        if table.shape[0] != n:
            raise DataError(
                f"{path}: {table.shape[0]} rows, but {index_path} has {n}; the two must list "
                "the same utterances row by row (truncated or mixed-up file). "
                "Re-fetch the data with: cmmm data download mosi"
            )
        file_binary = table[:, -1]
        mismatch = np.flatnonzero(file_binary != binary)
        if mismatch.size:
            r = int(mismatch[0])
            raise DataError(
                f"{path}: row {r + 1}: binary label {file_binary[r]:g} disagrees with "
                f"{TRANSCRIPTS} ({int(binary[r])}) for utterance {utterance_ids[r]}, which row "
                f"{r + 1} of {index_file(split)} points to ({mismatch.size} rows disagree); the "
                "files do not belong together. Re-fetch the data with: cmmm data download mosi"
            )
        result[f"features.{modality}"] = table[:, None, :-1].astype(np.float32)

    videos: list[str] = []
    labels = np.empty(n, dtype=np.float32)
    for r, utterance in enumerate(utterance_ids):
        match = _UTTERANCE_ID.match(utterance)
        assert match is not None  # _read_transcripts checked every id
        video, k = match["video"], int(match["k"])
        if video not in segment_labels:
            raise DataError(
                f"{root / LABELS_CSD}: no labels for video {video} (utterance {utterance} of "
                f"{TRANSCRIPTS}, row {r + 1} of {index_path}). "
                "Re-fetch the data with: cmmm data download mosi"
            )
        video_labels = segment_labels[video]
        if k > len(video_labels):
            raise DataError(
                f"{root / LABELS_CSD}: video {video} has {len(video_labels)} segments, but "
                f"utterance {utterance} of {TRANSCRIPTS} (row {r + 1} of {index_path}) needs "
                f"segment {k}. "
                "Re-fetch the data with: cmmm data download mosi"
            )
        videos.append(video)
        labels[r] = video_labels[k - 1]

    result["labels"] = labels
    result["binary"] = binary.astype(np.int8)
    result["groups"] = np.array(videos, dtype=str)
    result["utterance_ids"] = np.array(utterance_ids, dtype=str)
    return result


def _read_transcripts(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """Utterance ids, transcripts and binary labels of ``transcripts.csv``, in file order."""
    ids: list[str] = []
    texts: list[str] = []
    binary: list[int] = []
    seen: set[str] = set()
    for line, row in _csv_rows(path, 4):
        utterance, label = row[0].strip(), row[3].strip()
        if not _UTTERANCE_ID.match(utterance):
            raise DataError(
                f"{path}: line {line}: {utterance!r} is not an utterance id of the form "
                "<video>_<k>. Re-fetch the data with: cmmm data download mosi"
            )
        if utterance in seen:
            raise DataError(f"{path}: line {line}: utterance {utterance} is listed twice")
        if label not in ("0", "1"):
            raise DataError(
                f"{path}: line {line}: the binary label (column 4) must be 0 or 1, got {label!r}"
            )
        seen.add(utterance)
        ids.append(utterance)
        texts.append(row[1])
        binary.append(int(label))
    if not ids:
        raise DataError(
            f"{path}: the file is empty. Re-fetch the data with: cmmm data download mosi"
        )
    return ids, texts, np.array(binary, dtype=np.int8)


def _read_segment_labels(path: Path) -> dict[str, np.ndarray]:
    """Continuous label per segment of each video, in the order the .csd stores them."""
    import h5py  # imported here so the rest of the project does not pay for it

    labels: dict[str, np.ndarray] = {}
    try:
        with h5py.File(path, "r") as csd:
            # .get, not []: a damaged file may hold a dangling link, or a dataset where a
            # group belongs, and those must be reported, not raised as KeyError/AttributeError.
            data = csd.get(CSD_DATA_GROUP)
            if not isinstance(data, h5py.Group):
                raise DataError(
                    f"{path}: no group {CSD_DATA_GROUP!r}; this is not the CMU-MOSI opinion "
                    "label file. Re-fetch the data with: cmmm data download mosi"
                )
            for video in data:
                labels[video] = _read_video_labels(path, video, data.get(video))
    except (OSError, KeyError, RuntimeError, ValueError) as err:
        # What h5py raises on a damaged file: OSError (not HDF5, truncated), KeyError
        # (unreadable object headers), RuntimeError/ValueError (corrupt metadata).
        raise DataError(
            f"{path}: cannot be read as HDF5 ({type(err).__name__}: {one_line(err)}). "
            "Re-fetch the data with: cmmm data download mosi"
        ) from err
    return labels


def _read_video_labels(path: Path, video: str, group: object) -> np.ndarray:
    """The sentiment scores of one video's segments, checked against the SDK's layout."""
    import h5py

    where = f"{path}: {CSD_DATA_GROUP}/{video}"
    datasets = {}
    for name in ("features", "intervals"):
        dataset = group.get(name) if isinstance(group, h5py.Group) else None
        # A null dataspace has no shape: it holds no values at all.
        if not isinstance(dataset, h5py.Dataset) or dataset.shape is None:
            raise DataError(
                f"{where} must be a group holding the datasets 'features' and 'intervals'. "
                "Re-fetch the data with: cmmm data download mosi"
            )
        datasets[name] = dataset
    features, intervals = datasets["features"], datasets["intervals"]
    # Sentiment scores are real numbers; bool, complex, text or compound data is not a score
    # even where numpy would convert it.
    if features.dtype.kind not in "fiu":
        raise DataError(
            f"{where}/features must hold real numbers, got dtype {features.dtype}. "
            "Re-fetch the data with: cmmm data download mosi"
        )
    if len(features.shape) != 2 or features.shape[1] != 1:
        raise DataError(f"{where}/features must be (n, 1), got {features.shape}")
    if intervals.shape != (features.shape[0], 2):
        raise DataError(
            f"{where}/intervals must be ({features.shape[0]}, 2) like its features, got "
            f"{intervals.shape}"
        )
    values = np.asarray(features[()], dtype=np.float64)[:, 0]
    low, high = LABEL_RANGE
    if values.size and (
        not np.all(np.isfinite(values)) or values.min() < low or values.max() > high
    ):
        raise DataError(f"{where}/features must be finite sentiment scores in [{low:g}, {high:g}]")
    return values.astype(np.float32)


def _csv_rows(path: Path, columns: int):
    """Yield (line number, fields) of a headerless CSV whose rows must have ``columns`` fields.

    A single trailing empty field (a row ending with a comma) is dropped; blank lines are
    skipped.
    """
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            for row in reader:
                if not row:
                    continue
                if len(row) == columns + 1 and row[-1] == "":
                    row = row[:-1]
                if len(row) != columns:
                    raise DataError(
                        f"{path}: line {reader.line_num}: expected {columns} columns, got "
                        f"{len(row)} (truncated or corrupted file). "
                        "Re-fetch the data with: cmmm data download mosi"
                    )
                yield reader.line_num, row
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(
            f"{path}: not a readable CSV file ({err}). "
            "Re-fetch the data with: cmmm data download mosi"
        ) from err


def _read_numeric_csv(path: Path, columns: int, binary_last: bool = True) -> np.ndarray:
    """A headerless all-numeric CSV as float64 (rows, columns).

    With ``binary_last`` the last column is a binary label and must be 0 or 1.
    """
    rows: list[np.ndarray] = []
    for line, fields in _csv_rows(path, columns):
        # Python's float() for every cell, not numpy's parser: the two disagree on odd cells
        # (numpy reads "\x1c1" as 1), and the error below must find the cell that failed.
        try:
            values = np.array([float(cell) for cell in fields], dtype=np.float64)
        except ValueError:
            bad = next(i for i, cell in enumerate(fields) if not _is_number(cell))
            raise DataError(
                f"{path}: line {line}, column {bad + 1}: {fields[bad]!r} is not a number. "
                "Re-fetch the data with: cmmm data download mosi"
            ) from None
        if not np.all(np.isfinite(values)):
            bad = int(np.flatnonzero(~np.isfinite(values))[0])
            raise DataError(
                f"{path}: line {line}, column {bad + 1}: {fields[bad]!r} is NaN or infinite. "
                "Re-fetch the data with: cmmm data download mosi"
            )
        # Features are kept as float32, where a finite value such as 3.5e38 becomes infinite.
        with np.errstate(over="ignore"):
            beyond_float32 = ~np.isfinite(values.astype(np.float32))
        if beyond_float32.any():
            bad = int(np.flatnonzero(beyond_float32)[0])
            raise DataError(
                f"{path}: line {line}, column {bad + 1}: {fields[bad]!r} is beyond the float32 "
                "range the features are kept in. Re-fetch the data with: cmmm data download mosi"
            )
        if binary_last and values[-1] not in (0.0, 1.0):
            raise DataError(
                f"{path}: line {line}: the last column is the binary label and must be 0 or 1, "
                f"got {fields[-1]!r}"
            )
        rows.append(values)
    if not rows:
        raise DataError(
            f"{path}: the file is empty. Re-fetch the data with: cmmm data download mosi"
        )
    return np.stack(rows)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Assembling and caching


def _to_dataset(
    arrays: Mapping[str, np.ndarray], root: Path, valid_videos: int, split_seed: int
) -> MultimodalDataset:
    splits: dict[str, Split] = {}
    for split in SPLITS:
        splits[split] = Split(
            features={m: arrays[f"{split}.features.{m}"] for m in MODALITIES},
            labels=arrays[f"{split}.labels"],
            groups=arrays[f"{split}.groups"],
        )
    agree, total = (int(v) for v in arrays["sign_agreement"])
    notes: dict[str, object] = {
        "utterance_ids": {s: arrays[f"{s}.utterance_ids"] for s in SPLITS},
        "binary_labels": {s: arrays[f"{s}.binary"] for s in SPLITS},
        "sign_agreement": (agree, total),
        "valid_videos": valid_videos,
        "split_seed": split_seed,
        "split": "bc-LSTM train/test (speaker independent); valid = whole train videos",
        "label_join": "utterance <video>_<k> = k-th segment of the .csd in stored order",
    }
    return MultimodalDataset(
        name="mosi",
        modalities=MODALITIES,
        task_type="regression",
        metric_family="mosi",
        train=splits["train"],
        valid=splits["valid"],
        test=splits["test"],
        source=f"CMU-MOSI bc-LSTM utterance features + CMU SDK opinion labels in {root}",
        notes=notes,
    )


def _cache_key(digests: Mapping[str, str], valid_videos: int, split_seed: int) -> str:
    description = {
        "format": CACHE_FORMAT,
        "files": dict(sorted(digests.items())),
        "valid_videos": valid_videos,
        "split_seed": split_seed,
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def _expected_cache_names() -> set[str]:
    names = {"cache_key", "cache_format", CACHE_DIGEST, "sign_agreement"}
    for split in SPLITS:
        names |= {f"{split}.features.{m}" for m in MODALITIES}
        names |= {f"{split}.{n}" for n in ("labels", "binary", "groups", "utterance_ids")}
    return names


def _read_cache(cache_file: Path, key: str, log: Log) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None if there is no usable cache (then the caller rebuilds)."""
    if not cache_file.is_file():
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
        if set(arrays) != _expected_cache_names():
            raise ValueError("unexpected contents")
        if str(arrays["cache_key"]) != key or int(arrays["cache_format"]) != CACHE_FORMAT:
            raise ValueError("written for other source files or split")
        if str(arrays[CACHE_DIGEST]) != _arrays_digest(arrays):
            raise ValueError("its arrays do not match their sha256 (changed since written)")
        _check_cache_layout(arrays)
    # A cache is disposable: whatever is wrong with it (truncated zip, bad CRC, foreign file),
    # the answer is to rebuild, never to fail.
    except Exception as err:
        log(f"CMU-MOSI: ignoring unusable cache {cache_file} ({err}); rebuilding it")
        return None
    return arrays


def _arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 of every array's name, dtype, shape and bytes (but its own)."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        if name == CACHE_DIGEST:
            continue
        array = np.ascontiguousarray(arrays[name])
        digest.update(json.dumps([name, array.dtype.str, array.shape]).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _check_cache_layout(arrays: Mapping[str, np.ndarray]) -> None:
    """Raise ValueError unless every array has the dtype and shape ``_build_arrays`` gives it.

    The key only says which sources the cache was built from; a damaged or tampered cache can
    still hold arrays of other shapes or dtypes, which must not reach a run.
    """
    any_str = "str of any length"
    expected: dict[str, tuple[np.dtype | str, tuple[int, ...]]] = {
        "cache_key": (any_str, ()),
        "cache_format": (np.dtype(np.int64), ()),
        CACHE_DIGEST: (any_str, ()),
        "sign_agreement": (np.dtype(np.int64), (2,)),
    }
    for split in SPLITS:
        labels = arrays[f"{split}.labels"]
        n = labels.shape[0] if labels.ndim == 1 else -1
        expected[f"{split}.labels"] = (np.dtype(np.float32), (n,))
        expected[f"{split}.binary"] = (np.dtype(np.int8), (n,))
        expected[f"{split}.groups"] = (any_str, (n,))
        expected[f"{split}.utterance_ids"] = (any_str, (n,))
        for modality in MODALITIES:
            shape = (n, 1, FEATURE_DIMS[modality])
            expected[f"{split}.features.{modality}"] = (np.dtype(np.float32), shape)
    for name, (dtype, shape) in expected.items():
        array = arrays[name]
        right_dtype = array.dtype.kind == "U" if dtype == any_str else array.dtype == dtype
        if not right_dtype or array.shape != shape:
            raise ValueError(f"{name} has dtype {array.dtype} and shape {array.shape}")


def _write_cache(cache_file: Path, arrays: Mapping[str, np.ndarray], log: Log) -> None:
    """Write the cache atomically; failing to write it only costs a rebuild next time."""
    try:
        atomic_write(cache_file, lambda handle: np.savez(handle, **arrays))
    except OSError as err:
        log(f"CMU-MOSI: could not write the cache {cache_file} ({err}); continuing without it")
