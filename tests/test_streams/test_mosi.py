"""The real CMU-MOSI loader: the build on the real files, the cache, and errors on small copies."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
from mosi_fixtures import TEST_VIDEOS, TRAIN_VIDEOS, write_tiny_mosi

import streams.mosi as mosi
from cmmm.data.dataset import MultimodalDataset
from cmmm.errors import ConfigError, DataError, DatasetNotFoundError
from streams.mosi import MODALITIES, load_mosi, modality_file, mosi_cache_key

REPO = Path(__file__).resolve().parents[2]


def _data_dir() -> Path:
    configured = Path(os.environ.get("CMMM_DATA_DIR", REPO.parent / "shared" / "data"))
    # CI gives a path relative to the repository.
    return configured if configured.is_absolute() else (REPO / configured).resolve()


DATA_DIR = _data_dir()
needs_real_data = pytest.mark.skipif(
    not DATA_DIR.is_dir(), reason=f"data directory {DATA_DIR} absent (set CMMM_DATA_DIR)"
)


def _all_splits(ds: MultimodalDataset, what: str) -> np.ndarray:
    return np.concatenate([ds.notes[what][s] for s in ("train", "valid", "test")])


def _all_labels(ds: MultimodalDataset) -> np.ndarray:
    return np.concatenate([ds.train.labels, ds.valid.labels, ds.test.labels])


# --------------------------------------------------------------------------------------------
# The real data


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Never the default cache: that would write into the shared data directory.
    return tmp_path_factory.mktemp("mosi-cache")


@pytest.fixture(scope="module")
def real_build(real_cache: Path) -> tuple[MultimodalDataset, list[str]]:
    lines: list[str] = []
    dataset = load_mosi(DATA_DIR, cache_dir=real_cache, log=lines.append)
    return dataset, lines


@needs_real_data
def test_real_build_counts_shapes_and_types(real_build) -> None:
    ds, _ = real_build
    assert ds.name == "mosi"
    assert ds.modalities == ("audio", "video", "text")
    assert (ds.task_type, ds.metric_family) == ("regression", "mosi")
    assert len(ds.train) + len(ds.valid) == 1447
    assert len(ds.test) == 752
    for split in ds.splits.values():
        for modality, dim in (("audio", 73), ("video", 100), ("text", 100)):
            array = split.features[modality]
            assert array.shape == (len(split), 1, dim)
            assert array.dtype == np.float32
        assert split.labels.dtype == np.float32
        assert split.labels.shape == (len(split),)
    labels = _all_labels(ds)
    assert labels.min() == -3.0 and labels.max() == 3.0
    assert len(np.unique(_all_splits(ds, "utterance_ids"))) == 2199


@needs_real_data
def test_real_split_is_by_whole_videos(real_build) -> None:
    ds, _ = real_build
    videos = {name: set(split.groups.tolist()) for name, split in ds.splits.items()}
    assert (len(videos["train"]), len(videos["valid"]), len(videos["test"])) == (52, 10, 31)
    assert not videos["train"] & videos["valid"]
    assert not (videos["train"] | videos["valid"]) & videos["test"]
    ids = ds.notes["utterance_ids"]
    for name, split in ds.splits.items():
        from_ids = [u.rsplit("_", 1)[0] for u in ids[name]]
        assert from_ids == split.groups.tolist()


@needs_real_data
def test_real_labels_join_the_csd_in_stored_order(real_build) -> None:
    ds, _ = real_build
    ids = _all_splits(ds, "utterance_ids").tolist()
    labels = _all_labels(ds)
    binary = _all_splits(ds, "binary_labels")
    assert ds.notes["sign_agreement"] == (2199, 2199)
    assert int(np.sum((labels >= 0) == (binary == 1))) == 2199
    # The two videos whose stored order is not chronological: the transcript
    # "THERES A FEW MOMENTS YEAH THAT ARE ORIGINAL AND FUNNY" is positive.
    assert labels[ids.index("VbQk4H8hgr0_33")] == pytest.approx(0.4)
    assert labels[ids.index("VbQk4H8hgr0_46")] == pytest.approx(-1.8)
    assert labels[ids.index("03bSnISJMiM_1")] == pytest.approx(2.4)

    # Sorting the segments by start time (what SOURCES.md describes) would mislabel those
    # videos: only 2193 signs agree then.
    time_order_agree = 0
    with h5py.File(DATA_DIR / "mosi" / mosi.LABELS_CSD, "r") as csd:
        data = csd[mosi.CSD_DATA_GROUP]
        for utterance, bit in zip(ids, binary, strict=True):
            video, k = utterance.rsplit("_", 1)
            order = np.argsort(data[video]["intervals"][:, 0], kind="stable")
            value = data[video]["features"][:, 0][order][int(k) - 1]
            time_order_agree += int((value >= 0) == (bit == 1))
    assert time_order_agree == 2193


@needs_real_data
def test_real_build_reports_counts_and_label_statistics(real_build) -> None:
    ds, lines = real_build
    text = "\n".join(lines)
    assert "built from" in text
    assert f"train: {len(ds.train)} utterances, 52 videos" in text
    assert f"valid: {len(ds.valid)} utterances, 10 videos" in text
    assert "test: 752 utterances, 31 videos" in text
    assert f"max {ds.test.labels.max():+.2f}" in text
    assert "2199/2199" in text
    for word in ("mean", "std", "min", "max", "positive", "zero"):
        assert word in text


@needs_real_data
def test_real_second_call_uses_the_cache(real_build, real_cache, monkeypatch) -> None:
    first, _ = real_build

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(mosi, "_build_arrays", no_rebuild)
    lines: list[str] = []
    second = load_mosi(DATA_DIR, cache_dir=real_cache, log=lines.append)
    assert "loaded from cache" in lines[0]
    for name in ("train", "valid", "test"):
        a, b = first.splits[name], second.splits[name]
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.groups, b.groups)
        for modality in MODALITIES:
            np.testing.assert_array_equal(a.features[modality], b.features[modality])


@needs_real_data
def test_real_validation_videos_follow_the_seed(real_build, real_cache) -> None:
    ds, _ = real_build
    other = load_mosi(DATA_DIR, cache_dir=real_cache, split_seed=1, log=lambda _: None)
    assert set(other.valid.groups) != set(ds.valid.groups)
    assert set(other.test.groups) == set(ds.test.groups)
    assert len(set(other.valid.groups)) == 10
    assert len(other.train) + len(other.valid) == 1447


@needs_real_data
def test_real_cache_key_follows_source_bytes(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    shutil.copytree(DATA_DIR / "mosi", data_dir / "mosi")
    for path in data_dir.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    cache = tmp_path / "cache"
    before = load_mosi(data_dir, cache_dir=cache, log=lambda _: None)
    key_before = mosi_cache_key(data_dir)

    audio_test = data_dir / "mosi" / modality_file("audio", "test")
    text = audio_test.read_text()
    first_cell = text.split(",", 1)[0]
    assert first_cell.startswith('"') and first_cell != '"1.25"'
    audio_test.write_text('"1.25"' + text[len(first_cell) :])

    assert mosi_cache_key(data_dir) != key_before
    assert mosi_cache_key(data_dir, split_seed=1) != mosi_cache_key(data_dir)
    lines: list[str] = []
    after = load_mosi(data_dir, cache_dir=cache, log=lines.append)
    assert any("built from" in line for line in lines)
    assert any("differ from the published" in line for line in lines)
    assert after.test.features["audio"][0, 0, 0] == np.float32(1.25)
    assert before.test.features["audio"][0, 0, 0] != np.float32(1.25)
    assert len(list(cache.glob("*.npz"))) == 2


# --------------------------------------------------------------------------------------------
# Small generated copies


@pytest.fixture
def tiny(tmp_path: Path) -> Iterator[tuple[Path, dict[str, float]]]:
    data_dir = tmp_path / "data"
    yield data_dir, write_tiny_mosi(data_dir)


def _quiet(_: str) -> None:
    pass


def _load_tiny(data_dir: Path, **kwargs) -> MultimodalDataset:
    kwargs.setdefault("valid_videos", 1)
    kwargs.setdefault("log", _quiet)
    return load_mosi(data_dir, cache_dir=data_dir.parent / "cache", **kwargs)


def _replace_line(path: Path, line_number: int, new_line: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[line_number - 1] = new_line
    path.write_text("".join(lines))


def test_tiny_copy_loads_with_stored_order_labels(tiny) -> None:
    data_dir, labels = tiny
    ds = _load_tiny(data_dir)
    assert len(ds.train) + len(ds.valid) == 12 and len(ds.test) == 6
    assert set(ds.valid.groups) <= set(TRAIN_VIDEOS) and len(set(ds.valid.groups)) == 1
    assert set(ds.test.groups) == set(TEST_VIDEOS)
    assert "vid_B" in set(ds.train.groups) | set(ds.valid.groups)
    ids = _all_splits(ds, "utterance_ids").tolist()
    got = dict(zip(ids, _all_labels(ds).tolist(), strict=True))
    assert got == pytest.approx(labels)
    # Stored order, not time order: vidA_2 is the second stored segment.
    assert got["vidA_2"] == pytest.approx(-2.0)
    assert ds.notes["sign_agreement"] == (18, 18)
    assert ds.train.features["audio"].shape[1:] == (1, 73)


def test_missing_directory_names_the_download_command(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as caught:
        load_mosi(tmp_path / "nowhere", cache_dir=tmp_path / "cache", log=_quiet)
    message = str(caught.value)
    assert str(tmp_path / "nowhere" / "mosi") in message
    assert f"cmmm data download mosi --data-dir {tmp_path / 'nowhere'}" in message


def test_missing_file_names_the_file_and_the_download_command(tiny) -> None:
    data_dir, _ = tiny
    (data_dir / "mosi" / modality_file("video", "test")).unlink()
    with pytest.raises(DatasetNotFoundError) as caught:
        _load_tiny(data_dir)
    assert modality_file("video", "test") in str(caught.value)
    assert f"cmmm data download mosi --data-dir {data_dir}" in str(caught.value)


def test_truncated_csv_is_a_data_error_naming_the_file(tiny) -> None:
    data_dir, _ = tiny
    path = data_dir / "mosi" / modality_file("video", "train")
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(DataError, match="video_train0.csv") as caught:
        _load_tiny(data_dir)
    assert "line" in str(caught.value) or "rows" in str(caught.value)


def test_wrong_column_count_names_file_and_line(tiny) -> None:
    data_dir, _ = tiny
    path = data_dir / "mosi" / modality_file("text", "test")
    _replace_line(path, 2, '"0.5","0.25","1"\r\n')
    with pytest.raises(DataError, match=r"text_test0\.csv: line 2: expected 101 columns, got 3"):
        _load_tiny(data_dir)


@pytest.mark.parametrize(("cell", "problem"), [("nan", "NaN or infinite"), ("abc", "not a number")])
def test_bad_cell_names_file_line_and_column(tiny, cell: str, problem: str) -> None:
    data_dir, _ = tiny
    path = data_dir / "mosi" / modality_file("audio", "train")
    lines = path.read_text().splitlines(keepends=True)
    fields = lines[2].split(",")
    fields[4] = f'"{cell}"'
    lines[2] = ",".join(fields)
    path.write_text("".join(lines))
    with pytest.raises(DataError, match=rf"audio_train0\.csv: line 3, column 5: .*{problem}"):
        _load_tiny(data_dir)


def test_row_count_mismatch_names_the_file(tiny) -> None:
    data_dir, _ = tiny
    path = data_dir / "mosi" / modality_file("video", "test")
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))
    with pytest.raises(DataError, match=r"video_test0\.csv: 5 rows, but .*text_test\.csv has 6"):
        _load_tiny(data_dir)


def test_disagreeing_binary_label_names_the_file(tiny) -> None:
    data_dir, _ = tiny
    path = data_dir / "mosi" / modality_file("text", "train")
    lines = path.read_text().splitlines(keepends=True)
    fields = lines[0].rstrip("\r\n").split(",")
    fields[-1] = '"0"' if fields[-1] == '"1"' else '"1"'
    lines[0] = ",".join(fields) + "\r\n"
    path.write_text("".join(lines))
    with pytest.raises(DataError, match=r"text_train0\.csv: row 1: binary label"):
        _load_tiny(data_dir)


def test_video_missing_from_the_label_file(tiny) -> None:
    data_dir, _ = tiny
    with h5py.File(data_dir / "mosi" / mosi.LABELS_CSD, "a") as csd:
        del csd[f"{mosi.CSD_DATA_GROUP}/vidE"]
    with pytest.raises(DataError, match="no labels for video vidE"):
        _load_tiny(data_dir)


def test_segment_missing_from_the_label_file(tiny) -> None:
    data_dir, _ = tiny
    with h5py.File(data_dir / "mosi" / mosi.LABELS_CSD, "a") as csd:
        group = csd[f"{mosi.CSD_DATA_GROUP}/vidF"]
        features, intervals = group["features"][:2], group["intervals"][:2]
        del group["features"], group["intervals"]
        group["features"], group["intervals"] = features, intervals
    with pytest.raises(DataError, match="video vidF has 2 segments.*needs segment 3"):
        _load_tiny(data_dir)


def test_label_file_of_other_data_is_refused(tiny) -> None:
    data_dir, _ = tiny
    with h5py.File(data_dir / "mosi" / mosi.LABELS_CSD, "a") as csd:
        for group in csd[mosi.CSD_DATA_GROUP].values():
            group["features"][...] = np.where(group["features"][...] >= 0, -1.0, 1.0)
    with pytest.raises(DataError, match="agree in sign .* for only"):
        _load_tiny(data_dir)


def test_label_file_that_is_not_hdf5(tiny) -> None:
    data_dir, _ = tiny
    (data_dir / "mosi" / mosi.LABELS_CSD).write_bytes(b"not hdf5 at all")
    with pytest.raises(DataError, match="CMU_MOSI_Opinion_Labels.csd: cannot be read as HDF5"):
        _load_tiny(data_dir)


@pytest.mark.parametrize("valid_videos", [0, 4, -1])
def test_impossible_validation_size_is_a_config_error(tiny, valid_videos: int) -> None:
    data_dir, _ = tiny
    with pytest.raises(ConfigError, match="valid_videos"):
        _load_tiny(data_dir, valid_videos=valid_videos)


def test_bad_input_keeps_the_existing_cache(tiny) -> None:
    data_dir, _ = tiny
    _load_tiny(data_dir)
    (cache_file,) = (data_dir.parent / "cache").glob("*.npz")
    cached = cache_file.read_bytes()
    path = data_dir / "mosi" / modality_file("audio", "test")
    _replace_line(path, 1, '"oops"\r\n')
    with pytest.raises(DataError):
        _load_tiny(data_dir)
    assert cache_file.read_bytes() == cached
    assert list((data_dir.parent / "cache").iterdir()) == [cache_file]


def test_corrupted_cache_is_rebuilt(tiny) -> None:
    data_dir, _ = tiny
    first = _load_tiny(data_dir)
    (cache_file,) = (data_dir.parent / "cache").glob("*.npz")
    content = bytearray(cache_file.read_bytes())
    content[len(content) // 2] ^= 0xFF
    cache_file.write_bytes(bytes(content))
    lines: list[str] = []
    second = _load_tiny(data_dir, log=lines.append)
    assert any("rebuilding" in line for line in lines)
    np.testing.assert_array_equal(first.train.labels, second.train.labels)
    np.testing.assert_array_equal(first.test.features["video"], second.test.features["video"])
    # The rebuilt cache is whole again.
    third_lines: list[str] = []
    _load_tiny(data_dir, log=third_lines.append)
    assert "loaded from cache" in third_lines[0]


def test_unwritable_cache_only_costs_a_rebuild(tiny, monkeypatch) -> None:
    data_dir, _ = tiny

    def refuse(*args, **kwargs):
        raise OSError("disk full")

    import cmmm.atomic_files

    monkeypatch.setattr(cmmm.atomic_files.os, "replace", refuse)
    lines: list[str] = []
    ds = _load_tiny(data_dir, log=lines.append)
    assert len(ds.test) == 6
    assert any("could not write the cache" in line for line in lines)
    assert list((data_dir.parent / "cache").iterdir()) == []


def test_cache_with_damaged_arrays_is_rebuilt(tiny) -> None:
    data_dir, _ = tiny
    _load_tiny(data_dir)
    (cache_file,) = (data_dir.parent / "cache").glob("*.npz")
    with np.load(cache_file, allow_pickle=False) as stored:
        arrays = {name: stored[name] for name in stored.files}
    arrays["test.features.video"][0, 0, 0] = np.nan
    with open(cache_file, "wb") as fh:
        np.savez(fh, **arrays)
    lines: list[str] = []
    ds = _load_tiny(data_dir, log=lines.append)
    assert any("rebuilding" in line for line in lines)
    assert np.isfinite(ds.test.features["video"]).all()
