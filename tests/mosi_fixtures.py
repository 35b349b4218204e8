"""A small CMU-MOSI copy in the exact layout of the published files, for tests.

``write_tiny_mosi`` writes the bc-LSTM CSVs and the CMU SDK label file for six videos of three
utterances each, with the quirks of the real files (quoted cells, a trailing comma in the audio
CSVs, a video whose segments are not stored in time order).
"""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np

import streams.mosi as mosi
from streams.mosi import FEATURE_DIMS, MODALITIES, modality_file

TRAIN_VIDEOS = ("vidA", "vid_B", "vidC", "vidD")
TEST_VIDEOS = ("vidE", "vidF")
PER_VIDEO = 3


def _write_csv(path: Path, rows: list[list[object]], trailing_comma: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, quoting=csv.QUOTE_ALL, lineterminator="\r\n")
        for row in rows:
            writer.writerow([*row, ""] if trailing_comma else row)


def write_tiny_mosi(data_dir: Path) -> dict[str, float]:
    """A small dataset in the real layout; returns the continuous label of every utterance."""
    root = data_dir / "mosi"
    rng = np.random.default_rng(0)
    videos = TRAIN_VIDEOS + TEST_VIDEOS
    # Stored order of vidA is not chronological, like two real videos.
    intervals = {v: np.array([[0.0, 1.0], [1.0, 2.0], [2.0, 3.0]]) for v in videos}
    intervals["vidA"] = np.array([[0.0, 1.0], [5.0, 6.0], [2.0, 3.0]])
    values = {v: np.round(rng.uniform(-3, 3, PER_VIDEO), 2) for v in videos}
    values["vidA"] = np.array([1.0, -2.0, 0.5])
    values["vidC"][0] = 0.0
    labels = {f"{v}_{k + 1}": float(values[v][k]) for v in videos for k in range(PER_VIDEO)}

    # transcripts.csv lists utterances in a different order from the split files.
    utterances = sorted(labels)
    transcripts = [
        [u, "SOME WORDS, WITH A COMMA", videos.index(u.rsplit("_", 1)[0]) + 1, int(labels[u] >= 0)]
        for u in utterances
    ]
    _write_csv(root / mosi.TRANSCRIPTS, transcripts)
    for split, split_videos in (("train", TRAIN_VIDEOS), ("test", TEST_VIDEOS)):
        ids = [f"{v}_{k}" for v in split_videos for k in range(PER_VIDEO, 0, -1)]
        bits = [int(labels[u] >= 0) for u in ids]
        text = rng.normal(size=(len(ids), FEATURE_DIMS["text"])).round(4)
        _write_csv(
            root / mosi.index_file(split),
            [[utterances.index(u), *row] for u, row in zip(ids, text.tolist(), strict=True)],
        )
        for modality in MODALITIES:
            features = (
                text
                if modality == "text"
                else rng.normal(size=(len(ids), FEATURE_DIMS[modality])).round(4)
            )
            _write_csv(
                root / modality_file(modality, split),
                [[*row, bit] for row, bit in zip(features.tolist(), bits, strict=True)],
                trailing_comma=modality == "audio",
            )
    csd_path = root / mosi.LABELS_CSD
    csd_path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(csd_path, "w") as csd:
        for v in videos:
            group = csd.create_group(f"{mosi.CSD_DATA_GROUP}/{v}")
            group["features"] = values[v][:, None].astype(np.float32)
            group["intervals"] = intervals[v]
    return labels
