"""The embedded synthetic streams: seeded, shaped like MOSI/IEMOCAP, text and audio informative."""

from __future__ import annotations

import numpy as np
import pytest

from streams.synthetic import SyntheticSpec, make_synthetic


@pytest.fixture(scope="module")
def regression():
    return make_synthetic(SyntheticSpec())


@pytest.fixture(scope="module")
def classification():
    return make_synthetic(SyntheticSpec(task_type="classification"))


def arrays(dataset) -> list[np.ndarray]:
    out = []
    for split in dataset.splits.values():
        out.extend(split.features[m] for m in dataset.modalities)
        out.append(split.labels)
    return out


def test_same_seed_gives_identical_arrays(regression) -> None:
    again = make_synthetic(SyntheticSpec())
    for a, b in zip(arrays(regression), arrays(again), strict=True):
        assert a.dtype == b.dtype
        assert np.array_equal(a, b)


def test_different_seed_gives_different_arrays(regression) -> None:
    other = make_synthetic(SyntheticSpec(seed=1))
    for a, b in zip(arrays(regression), arrays(other), strict=True):
        assert a.shape == b.shape
        assert not np.array_equal(a, b)


def test_splits_are_different_draws(regression) -> None:
    n = min(len(regression.valid), len(regression.test))
    for m in regression.modalities:
        assert not np.array_equal(regression.valid.features[m][:n], regression.test.features[m][:n])


def test_shapes_per_modality(regression) -> None:
    spec = SyntheticSpec()
    assert regression.modalities == ("audio", "video", "text")
    expected = {"audio": (4, 12), "video": (3, 16), "text": (5, 20)}
    for split, n in (
        (regression.train, spec.n_train),
        (regression.valid, spec.n_valid),
        (regression.test, spec.n_test),
    ):
        assert split.labels.shape == (n,)
        for m, (length, width) in expected.items():
            assert split.features[m].shape == (n, length, width)
            assert split.features[m].dtype == np.float32
    assert len({regression.train.features[m].shape[1:] for m in regression.modalities}) == 3


def test_custom_sizes_and_shapes() -> None:
    spec = SyntheticSpec(
        n_train=10,
        n_valid=3,
        n_test=5,
        modalities=("x", "y"),
        seq_lens=(2, 7),
        feature_dims=(3, 1),
        signal=(1.0, 0.5),
    )
    data = make_synthetic(spec)
    assert data.modalities == ("x", "y")
    assert data.train.features["x"].shape == (10, 2, 3)
    assert data.valid.features["y"].shape == (3, 7, 1)
    assert len(data.test) == 5


def test_mismatched_spec_lengths_are_rejected() -> None:
    with pytest.raises(ValueError):
        make_synthetic(SyntheticSpec(seq_lens=(4, 3)))


def test_regression_labels(regression) -> None:
    assert regression.task_type == "regression"
    assert regression.metric_family == "mosi"
    assert regression.num_classes == 1
    for split in regression.splits.values():
        labels = split.labels
        assert labels.dtype == np.float32
        assert labels.min() >= -3.0 and labels.max() <= 3.0
        # Spread out, both signs present (a sentiment-like target, not a constant).
        assert labels.std() > 0.5
        assert (labels > 0).any() and (labels < 0).any()


def test_classification_has_four_classes_all_present(classification) -> None:
    assert classification.name == "synthetic-cls"
    assert classification.task_type == "classification"
    assert classification.metric_family == "classification"
    assert classification.num_classes == 4
    assert len(classification.class_names) == 4
    for split in classification.splits.values():
        assert split.labels.dtype == np.int64
        assert set(np.unique(split.labels).tolist()) == {0, 1, 2, 3}


def _probe_regression(dataset, modality: str) -> tuple[float, float]:
    """Least-squares linear probe on the flattened modality: test R^2 and sign accuracy."""
    x_train = dataset.train.features[modality].reshape(len(dataset.train), -1).astype(np.float64)
    x_test = dataset.test.features[modality].reshape(len(dataset.test), -1).astype(np.float64)
    a_train = np.c_[x_train, np.ones(len(x_train))]
    a_test = np.c_[x_test, np.ones(len(x_test))]
    weights = np.linalg.lstsq(a_train, dataset.train.labels.astype(np.float64), rcond=None)[0]
    pred = a_test @ weights
    y = dataset.test.labels.astype(np.float64)
    r2 = 1.0 - ((pred - y) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    nonzero = y != 0
    sign_acc = float((np.sign(pred[nonzero]) == np.sign(y[nonzero])).mean())
    return float(r2), sign_acc


def _probe_classification(dataset, modality: str) -> float:
    """One-vs-all least-squares probe: test accuracy."""
    x_train = dataset.train.features[modality].reshape(len(dataset.train), -1).astype(np.float64)
    x_test = dataset.test.features[modality].reshape(len(dataset.test), -1).astype(np.float64)
    targets = np.eye(dataset.num_classes)[dataset.train.labels]
    weights = np.linalg.lstsq(np.c_[x_train, np.ones(len(x_train))], targets, rcond=None)[0]
    pred = np.argmax(np.c_[x_test, np.ones(len(x_test))] @ weights, axis=1)
    return float((pred == dataset.test.labels).mean())


def test_text_and_audio_carry_more_signal_than_video_regression(regression) -> None:
    scores = {m: _probe_regression(regression, m) for m in regression.modalities}
    r2 = {m: s[0] for m, s in scores.items()}
    sign = {m: s[1] for m, s in scores.items()}
    assert r2["text"] > r2["video"] + 0.3, r2
    assert r2["audio"] > r2["video"] + 0.3, r2
    assert sign["text"] > sign["video"], sign
    assert sign["audio"] > sign["video"], sign
    # Every modality holds some signal: video is weak, not empty.
    assert r2["video"] > 0.0, r2


def test_text_and_audio_carry_more_signal_than_video_classification(classification) -> None:
    acc = {m: _probe_classification(classification, m) for m in classification.modalities}
    assert acc["text"] > acc["video"] + 0.1, acc
    assert acc["audio"] > acc["video"] + 0.1, acc


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_text_beats_video_for_other_seeds(seed: int) -> None:
    data = make_synthetic(SyntheticSpec(seed=seed))
    assert _probe_regression(data, "text")[0] > _probe_regression(data, "video")[0] + 0.3


def test_zero_signal_modality_is_uninformative() -> None:
    # Sanity check of the probe itself: with no signal, video's R^2 is not above zero by much.
    data = make_synthetic(SyntheticSpec(signal=(0.7, 0.0, 1.0)))
    assert _probe_regression(data, "video")[0] < 0.05
    assert _probe_regression(data, "text")[0] > 0.5


def test_dataset_metadata(regression) -> None:
    assert regression.name == "synthetic"
    assert "synthetic" in regression.source and "seed 0" in regression.source
    assert regression.validate() is regression


def test_num_classes_is_an_option_of_the_classification_stream_only(tmp_path) -> None:
    from cmmm.data.catalog import STREAMS, StreamRequest
    from cmmm.errors import ConfigError

    assert "num_classes" in STREAMS.get("synthetic-cls").options
    assert "num_classes" not in STREAMS.get("synthetic").options

    def request(**options: object) -> StreamRequest:
        return StreamRequest(tmp_path, tmp_path, log=lambda _: None, options=options)

    assert STREAMS.get("synthetic-cls").factory(request(num_classes=3, n_train=60)).num_classes == 3
    with pytest.raises(ConfigError, match="unknown stream options \\['num_classes'\\]"):
        STREAMS.get("synthetic").factory(request(num_classes=3))
