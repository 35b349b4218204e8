"""Standardisation uses train statistics only and leaves constant features finite."""

from __future__ import annotations

import dataclasses

import numpy as np

from cmmm.data.standardization import standardize
from streams.synthetic import SyntheticSpec, make_synthetic


def test_train_split_becomes_zero_mean_unit_std_per_feature() -> None:
    dataset = standardize(make_synthetic(SyntheticSpec(n_train=200, n_valid=20, n_test=40)))
    for m in dataset.modalities:
        flat = dataset.train.features[m].reshape(-1, dataset.feature_dim(m))
        np.testing.assert_allclose(flat.mean(axis=0), 0.0, atol=1e-5)
        np.testing.assert_allclose(flat.std(axis=0), 1.0, atol=1e-4)


def test_test_split_uses_train_statistics_not_its_own() -> None:
    raw = make_synthetic(SyntheticSpec(n_train=100, n_valid=20, n_test=40))
    shifted_test = dataclasses.replace(
        raw.test, features={m: a + 5.0 for m, a in raw.test.features.items()}
    )
    dataset = standardize(dataclasses.replace(raw, test=shifted_test))
    # Standardised with its own statistics the shift would vanish; with train's it stays.
    for m in dataset.modalities:
        assert dataset.test.features[m].mean() > 1.0


def test_constant_feature_is_centred_not_divided_by_zero() -> None:
    raw = make_synthetic(SyntheticSpec(n_train=50, n_valid=10, n_test=10))
    audio = raw.train.features["audio"].copy()
    audio[:, :, 0] = 7.0
    train = dataclasses.replace(raw.train, features={**raw.train.features, "audio": audio})
    dataset = standardize(dataclasses.replace(raw, train=train))
    column = dataset.train.features["audio"][:, :, 0]
    assert np.isfinite(column).all()
    np.testing.assert_array_equal(column, 0.0)
    assert dataset.train.labels is raw.train.labels or np.array_equal(
        dataset.train.labels, raw.train.labels
    )


def test_padded_sequences_use_real_steps_only_and_stay_zero_in_the_padding() -> None:
    raw = make_synthetic(SyntheticSpec(n_train=50, n_valid=10, n_test=10))
    splits = {}
    for name, split in raw.splits.items():
        text = split.features["text"] + 3.0
        lengths = np.arange(len(split)) % text.shape[1] + 1
        text[np.arange(text.shape[1])[None, :] >= lengths[:, None]] = 0.0
        splits[name] = dataclasses.replace(
            split, features={**split.features, "text": text}, lengths={"text": lengths}
        )
    dataset = standardize(dataclasses.replace(raw, **splits))
    train = dataset.train
    real = np.arange(train.features["text"].shape[1])[None, :] < train.lengths["text"][:, None]
    # Had the zeros counted, the +3 shift would leave real steps far from mean 0.
    np.testing.assert_allclose(train.features["text"][real].mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(train.features["text"][real].std(axis=0), 1.0, atol=1e-4)
    for split in dataset.splits.values():
        padding = (
            np.arange(split.features["text"].shape[1])[None, :] >= split.lengths["text"][:, None]
        )
        assert padding.any() and not split.features["text"][padding].any()
