"""Per-feature standardisation with train-split statistics.

The real MOSI features come on very different scales (openSMILE audio columns with standard
deviations from 0 to ~50, text embeddings below 1); an unscaled modality either dominates the
model or is ignored. Statistics come from the train split only, so nothing of the test split
leaks; a zero-filled missing modality then sits at the train mean. Constant features are centred
and left unscaled.

Padded sequences (a split's ``lengths``, e.g. encoded transcripts) are scaled with statistics of
their real time steps only, and their padding stays exactly zero. Counting the padding would
drag the mean towards zero and distort the spread by however much padding there happens to be
(about half of all positions for MOSI transcripts at 32 tokens). Zero after scaling is the train
mean: the same "no information" value that a missing modality gets.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cmmm.data.dataset import MultimodalDataset, Split


def padding_mask(split: Split, modality: str) -> np.ndarray | None:
    """(N, L) True at padded time steps of ``modality``, or None when it has no padding."""
    lengths = split.lengths.get(modality)
    if lengths is None:
        return None
    steps = split.features[modality].shape[1]
    return np.arange(steps)[None, :] >= lengths[:, None]


def standardize(dataset: MultimodalDataset) -> MultimodalDataset:
    stats = {}
    for m in dataset.modalities:
        train = dataset.train.features[m].astype(np.float64)
        padding = padding_mask(dataset.train, m)
        flat = train.reshape(-1, train.shape[-1]) if padding is None else train[~padding]
        mean = flat.mean(axis=0)
        std = flat.std(axis=0)
        stats[m] = (mean, np.where(std > 1e-8, std, 1.0))

    def scaled(split: Split) -> Split:
        features = {}
        for m in dataset.modalities:
            values = ((split.features[m] - stats[m][0]) / stats[m][1]).astype(np.float32)
            padding = padding_mask(split, m)
            if padding is not None:
                values[padding] = 0.0
            features[m] = values
        return dataclasses.replace(split, features=features)

    return dataclasses.replace(
        dataset,
        train=scaled(dataset.train),
        valid=scaled(dataset.valid),
        test=scaled(dataset.test),
        notes={**dataset.notes, "standardized": "per feature, train-split mean and std"},
    ).validate()
