from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from pickle_fixtures import (
    iemocap_onehot,
    mmsa_content,
    mult_content,
    write_mmsa_pickle,
    write_mult_pickle,
    write_pickle,
)

from cmmm.errors import ConfigError, DataError, DatasetNotFoundError
from streams.pickles import load_mmsa_pickle, load_mult_pickle, load_pickle_stream


class LogLines(list):
    def __call__(self, message: str) -> None:
        self.append(message)

    def text(self) -> str:
        return "\n".join(self)


def test_mult_mosi_loads_with_shapes_from_the_file(tmp_path: Path) -> None:
    content = mult_content("mosi", widths={"text": 11, "audio": 5, "vision": 3}, seq_len=7)
    path = write_pickle(tmp_path / "mosi_data.pkl", content)
    log = LogLines()

    dataset = load_mult_pickle(path, "mosi", log=log)

    assert dataset.modalities == ("audio", "video", "text")
    assert dataset.task_type == "regression" and dataset.metric_family == "mosi"
    assert (len(dataset.train), len(dataset.valid), len(dataset.test)) == (24, 8, 8)
    assert (dataset.feature_dim("audio"), dataset.feature_dim("video")) == (5, 3)
    assert dataset.feature_dim("text") == 11 and dataset.seq_len("text") == 7
    for split in ("train", "valid", "test"):
        loaded = dataset.splits[split]
        np.testing.assert_array_equal(loaded.features["video"], content[split]["vision"])
        np.testing.assert_array_equal(loaded.features["text"], content[split]["text"])
        np.testing.assert_allclose(loaded.labels, content[split]["labels"].reshape(-1))
        assert loaded.labels.dtype == np.float32 and loaded.labels.shape == (len(loaded),)
    # MulT's ids are (video, start, end) rows; the video is the group.
    assert dataset.train.groups is not None and dataset.train.groups[:4].tolist() == [
        "vid0",
        "vid0",
        "vid0",
        "vid1",
    ]
    assert "mosi_data.pkl" in log.text()


def test_audio_neg_inf_is_zeroed_and_counted(tmp_path: Path) -> None:
    content = mult_content("mosi", audio_neg_inf=5)
    path = write_pickle(tmp_path / "mosi_data.pkl", content)
    log = LogLines()

    dataset = load_mult_pickle(path, "mosi", log=log)

    assert dataset.notes["audio_neg_inf_zeroed"] == {"train": 5, "valid": 5, "test": 5}
    assert "-inf" in log.text() and "train 5" in log.text()
    original = content["train"]["audio"]
    loaded = dataset.train.features["audio"]
    was_neg_inf = np.isneginf(original)
    assert was_neg_inf.sum() == 5
    assert np.all(loaded[was_neg_inf] == 0.0)
    np.testing.assert_array_equal(loaded[~was_neg_inf], original[~was_neg_inf])


def test_neg_inf_in_read_only_protocol5_arrays_is_zeroed(tmp_path: Path) -> None:
    content = mmsa_content(audio_neg_inf=3)
    for entry in content.values():
        # Protocol 5 stores a read-only array's buffer as bytes, so it is rebuilt read-only.
        entry["audio"].flags.writeable = False
    path = write_pickle(tmp_path / "p5.pkl", content, protocol=5)
    dataset = load_mmsa_pickle(path, "mosi", log=LogLines())
    assert np.isfinite(dataset.test.features["audio"]).all()
    assert dataset.notes["audio_neg_inf_zeroed"]["test"] == 3


def test_iemocap_onehot_maps_to_classes_on_a_hand_made_example(tmp_path: Path) -> None:
    content = mult_content("iemocap")
    labels = np.zeros((24, 4, 2), dtype=np.float32)
    labels[:, :, 0] = 1
    expected = []
    for row in range(24):
        cls = (row * 3 + 1) % 4
        labels[row, cls] = (0, 1)
        expected.append(cls)
    content["train"]["labels"] = labels
    # Row 0 of valid: happy; row 1: angry; the rest neutral.
    content["valid"]["labels"] = iemocap_onehot([1, 3, 0, 0, 0, 0, 0, 0])
    path = write_pickle(tmp_path / "iemocap_data.pkl", content)

    dataset = load_mult_pickle(path, "iemocap", log=LogLines())

    assert dataset.task_type == "classification" and dataset.metric_family == "classification"
    assert dataset.num_classes == 4
    assert dataset.class_names == ("neutral", "happy", "sad", "angry")
    assert dataset.train.labels.tolist() == expected
    assert dataset.valid.labels.tolist() == [1, 3, 0, 0, 0, 0, 0, 0]
    assert dataset.train.labels.dtype.kind == "i"


def test_iemocap_rows_without_exactly_one_emotion_are_dropped_and_reported(
    tmp_path: Path,
) -> None:
    content = mult_content("iemocap")
    labels = iemocap_onehot([0, 1, 2, 3, 0, 1, 2, 3])
    labels[2] = ((1, 0), (1, 0), (1, 0), (1, 0))  # no emotion
    labels[5, 3] = (0, 1)  # happy and angry
    content["test"]["labels"] = labels
    path = write_pickle(tmp_path / "iemocap_data.pkl", content)
    log = LogLines()

    dataset = load_mult_pickle(path, "iemocap", log=log)

    assert dataset.test.labels.tolist() == [0, 1, 3, 0, 2, 3]
    kept = [0, 1, 3, 4, 6, 7]
    np.testing.assert_array_equal(dataset.test.features["audio"], content["test"]["audio"][kept])
    assert dataset.test.groups is not None and len(dataset.test.groups) == 6
    assert dataset.notes["iemocap_rows_dropped"] == {"train": 0, "valid": 0, "test": 2}
    assert "dropped" in log.text() and "test 2" in log.text()


def test_mmsa_unaligned_loads_text_not_text_bert(tmp_path: Path) -> None:
    content = mmsa_content(lengths={"text": 6, "audio": 8, "vision": 5})
    path = write_pickle(tmp_path / "MOSI" / "Processed" / "unaligned_50.pkl", content)

    dataset = load_mmsa_pickle(path, "mosi", log=LogLines())

    assert dataset.metric_family == "mosi" and dataset.task_type == "regression"
    assert {m: dataset.seq_len(m) for m in dataset.modalities} == {
        "audio": 8,
        "video": 5,
        "text": 6,
    }
    assert dataset.feature_dim("text") == 9
    np.testing.assert_array_equal(dataset.valid.features["text"], content["valid"]["text"])
    np.testing.assert_array_equal(dataset.test.labels, content["test"]["regression_labels"])
    assert dataset.notes["aligned"] is False
    assert dataset.train.groups is not None and dataset.train.groups[4] == "video1"


def test_mmsa_sims_gets_the_sims_metric_family(tmp_path: Path) -> None:
    path = write_mmsa_pickle(tmp_path / "unaligned_39.pkl", label_range=1.0)
    dataset = load_mmsa_pickle(path, "sims", log=LogLines())
    assert dataset.metric_family == "sims"
    assert np.abs(dataset.train.labels).max() <= 1.0


def test_mmsa_labels_of_shape_n_by_1_are_flattened(tmp_path: Path) -> None:
    content = mmsa_content(with_metadata=False)
    for entry in content.values():
        entry["regression_labels"] = entry["regression_labels"].reshape(-1, 1)
    dataset = load_mmsa_pickle(write_pickle(tmp_path / "a.pkl", content), "mosi", LogLines())
    assert dataset.train.labels.shape == (24,)


# --- damaged files -------------------------------------------------------------------------


def _damaged_mult(tmp_path: Path, damage) -> Path:
    content = mult_content("mosi")
    damage(content)
    return write_pickle(tmp_path / "damaged_mosi.pkl", content)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda c: c.pop("valid"), "missing split 'valid'.*keys found"),
        (lambda c: c["train"].pop("vision"), "no key 'vision'.*keys found.*audio"),
        (lambda c: c["test"].pop("labels"), "no key 'labels'"),
        (
            lambda c: c["train"].__setitem__("audio", c["train"]["audio"][:, :, 0]),
            r"train/audio has shape \(24, 6\), expected \(N, L, D\)",
        ),
        (
            lambda c: c["valid"].__setitem__("text", c["valid"]["text"][:5]),
            "different numbers of samples",
        ),
        (
            lambda c: c["test"].__setitem__("labels", c["test"]["labels"][:3]),
            "test/labels has 3 rows",
        ),
        (
            lambda c: c["test"].__setitem__("vision", c["test"]["vision"][:, :, :2]),
            r"test/vision has \(L, D\) = \(6, 2\) but train has \(6, 4\)",
        ),
        (
            lambda c: c["valid"]["vision"].__setitem__((0, 0, 0), np.nan),
            "valid/vision holds 1 NaN",
        ),
        (lambda c: c["train"]["audio"].__setitem__((1, 2, 3), np.inf), "train/audio holds 0 NaN"),
        (lambda c: c["train"]["labels"].__setitem__((0, 0, 0), np.nan), "train/labels holds 1 NaN"),
        (
            lambda c: c["train"].__setitem__("text", np.array(["a"] * 24, dtype=object)),
            "train/text must be a numeric array",
        ),
    ],
    ids=[
        "missing-split",
        "missing-key",
        "missing-labels",
        "2d-audio",
        "n-mismatch-modalities",
        "n-mismatch-labels",
        "width-differs-between-splits",
        "nan-vision",
        "pos-inf-audio",
        "nan-label",
        "object-text",
    ],
)
def test_damaged_mult_file_raises_data_error_naming_the_file(
    tmp_path: Path, damage, expected: str
) -> None:
    path = _damaged_mult(tmp_path, damage)
    with pytest.raises(DataError, match=expected) as info:
        load_mult_pickle(path, "mosi", log=LogLines())
    assert "damaged_mosi.pkl" in str(info.value)


def test_wrong_iemocap_label_shape_is_an_error(tmp_path: Path) -> None:
    content = mult_content("iemocap")
    content["valid"]["labels"] = content["valid"]["labels"][:, :3]
    path = write_pickle(tmp_path / "iemocap_data.pkl", content)
    with pytest.raises(DataError, match=r"iemocap_data.pkl: valid/labels has shape \(8, 3, 2\)"):
        load_mult_pickle(path, "iemocap", log=LogLines())


def test_nan_in_mmsa_text_names_file_split_and_key(tmp_path: Path) -> None:
    content = mmsa_content()
    content["test"]["text"][2, 1, 0] = np.nan
    path = write_pickle(tmp_path / "aligned_50.pkl", content)
    with pytest.raises(DataError, match="aligned_50.pkl: test/text holds 1 NaN"):
        load_mmsa_pickle(path, "mosi", log=LogLines())


def test_truncated_file_is_a_data_error_naming_the_file(tmp_path: Path) -> None:
    full = write_mult_pickle(tmp_path / "full.pkl").read_bytes()
    path = tmp_path / "mosi_data.pkl"
    path.write_bytes(full[: len(full) - 100])
    with pytest.raises(DataError, match="mosi_data.pkl is truncated or not a pickle"):
        load_mult_pickle(path, "mosi", log=LogLines())


def test_a_non_dict_pickle_is_rejected(tmp_path: Path) -> None:
    path = write_pickle(tmp_path / "list.pkl", [1, 2, 3])
    with pytest.raises(DataError, match="list.pkl: expected a dict"):
        load_mmsa_pickle(path, "mosi", log=LogLines())


# --- stream lookup -------------------------------------------------------------------------


def test_stream_iemocap_finds_and_detects_mult(tmp_path: Path) -> None:
    write_mult_pickle(tmp_path / "iemocap" / "iemocap_data.pkl", "iemocap")
    log = LogLines()
    dataset = load_pickle_stream("iemocap", tmp_path, log=log)
    assert dataset.name == "iemocap" and dataset.num_classes == 4
    assert dataset.notes["format"] == "mult"
    assert "MULT pickle" in log.text()


def test_stream_sims_prefers_unaligned_39_and_detects_mmsa(tmp_path: Path) -> None:
    write_mmsa_pickle(
        tmp_path / "sims" / "aligned_39.pkl", sizes={"train": 4, "valid": 2, "test": 2}
    )
    write_mmsa_pickle(tmp_path / "sims" / "unaligned_39.pkl")
    dataset = load_pickle_stream("sims", tmp_path, log=LogLines())
    assert dataset.notes["format"] == "mmsa" and dataset.metric_family == "sims"
    assert dataset.notes["path"].endswith("unaligned_39.pkl") and len(dataset.train) == 24


def test_stream_sims_accepts_aligned_files(tmp_path: Path) -> None:
    lengths = {"text": 6, "audio": 6, "vision": 6}
    write_mmsa_pickle(tmp_path / "sims" / "aligned_39.pkl", lengths=lengths)
    dataset = load_pickle_stream("sims", tmp_path, log=LogLines())
    assert dataset.notes["path"].endswith("aligned_39.pkl") and dataset.notes["aligned"] is True


@pytest.mark.parametrize(
    ("file_name", "file_format"),
    [("mosi_data.pkl", "mult"), ("aligned_50.pkl", "mmsa"), ("unaligned_50.pkl", "mmsa")],
)
def test_stream_mosi_pkl_accepts_both_layouts(
    tmp_path: Path, file_name: str, file_format: str
) -> None:
    path = tmp_path / "mosi" / file_name
    if file_format == "mult":
        write_mult_pickle(path)
    else:
        write_mmsa_pickle(path)
    dataset = load_pickle_stream("mosi-pkl", tmp_path, log=LogLines())
    assert dataset.notes["format"] == file_format
    assert dataset.name == "mosi" and dataset.metric_family == "mosi"


def test_missing_stream_file_says_where_it_looked_and_where_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_pickle_stream("mosi-pkl", tmp_path, log=LogLines())
    message = str(info.value)
    assert str(tmp_path / "mosi" / "mosi_data.pkl") in message
    assert str(tmp_path / "mosi" / "aligned_50.pkl") in message
    assert "MulT" in message and "MMSA" in message and "Place the file in" in message


def test_missing_iemocap_file_points_to_mult(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="iemocap_data.pkl.*MulT"):
        load_pickle_stream("iemocap", tmp_path, log=LogLines())


def test_unrecognised_layout_is_reported(tmp_path: Path) -> None:
    write_pickle(
        tmp_path / "mosi" / "mosi_data.pkl",
        {s: {"text": np.zeros((2, 2, 2))} for s in ("train", "valid", "test")},
        protocol=pickle.DEFAULT_PROTOCOL,
    )
    with pytest.raises(DataError, match="mosi_data.pkl: cannot tell the pickle layout"):
        load_pickle_stream("mosi-pkl", tmp_path, log=LogLines())


def test_unknown_stream_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown pickle stream 'mosei'"):
        load_pickle_stream("mosei", tmp_path, log=LogLines())


class _Hostile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, (f"touch {self.marker}",))


def test_stream_loader_refuses_a_hostile_pickle_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    content = mult_content("iemocap")
    content["train"]["labels"] = _Hostile(marker)
    write_pickle(tmp_path / "iemocap" / "iemocap_data.pkl", content)
    with pytest.raises(DataError, match="refusing to load .*system.* from .*iemocap_data.pkl"):
        load_pickle_stream("iemocap", tmp_path, log=LogLines())
    assert not marker.exists()
